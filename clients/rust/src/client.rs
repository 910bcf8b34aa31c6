//! The client: a handle for the application and the task that owns the connection.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_util::{SinkExt, Stream, StreamExt};
use roomcast_proto::envelope::{self, ClientMsg, ServerMsg, validate_kind, validate_room};
use serde_json::value::RawValue;
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::{Instant, sleep_until, timeout};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{self, Message as WsMessage};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use crate::backoff::{PROTOCOL_ERROR_ATTEMPT, goaway_delay};
use crate::config::{Config, ConfigError, Encoding, Endpoint};
use crate::event::{ConnectionState, ErrorEvent, Event, Position};
use crate::retry::{Retry, after_close, after_refusal};
use crate::rooms::Rooms;
use crate::token::Token;
use crate::urls;

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// A token with less than this left is not used for a new connection.
const TOKEN_STALE_MARGIN: Duration = Duration::from_secs(5);
/// After a refused or failed refresh, try again this much later (while the token lasts).
const REFRESH_RETRY: Duration = Duration::from_secs(5);
/// A goaway's dispatch URL that failed this many times is given up for the configured endpoint.
const GOAWAY_DISPATCH_TRIES: u32 = 3;
/// How long a polite close may take before the socket is just dropped.
const CLOSE_GRACE: Duration = Duration::from_millis(500);

/// Why a request of the application's was not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    /// A room name the edge would refuse.
    #[error("bad room name: {0}")]
    Room(&'static str),
    /// A kind name the edge would refuse.
    #[error("bad kind: {0}")]
    Kind(&'static str),
    /// A body that is not JSON.
    #[error("body is not JSON: {0}")]
    Body(String),
    /// The client was closed.
    #[error("the client is closed")]
    Closed,
}

enum Command {
    Join { room: String, from: Option<Position> },
    Leave,
    Publish { kind: String, body: String },
    Position { room: String, reply: oneshot::Sender<Option<Position>> },
}

/// A roomcast client: one connection (at most one room at a time, as the protocol has it),
/// kept alive across drains, restarts and network loss.
///
/// [`Client::start`] spawns the task that owns the connection on the current tokio runtime and
/// returns the handle and the [`Events`] stream. The task runs until [`Client::close`], until
/// the handle is dropped, or until the application drops [`Events`].
///
/// What it does for the application:
/// - finds an edge through dispatch (or a fixed URL), in the chosen encoding;
/// - reconnects with exponential backoff and full jitter, never faster than the edge asked;
/// - follows `goaway` (drain) to the dispatch URL it names, after the delay it names;
/// - resumes the room with `since` and `epoch`; reports recovered messages, explicit gaps and
///   resets; drops duplicates, so every message reaches the application at most once and in
///   order;
/// - notices a dead connection within [`Config::liveness`];
/// - gets tokens from an async callback, refreshes them before `exp`, refetches on 401/4001.
///
/// ```no_run
/// # async fn f() -> Result<(), Box<dyn std::error::Error>> {
/// use roomcast_client::{Client, Config, Event, Kind};
/// let (client, mut events) = Client::start(Config::dispatch("http://127.0.0.1:8081/v1/route").room("lobby"))?;
/// while let Some(ev) = events.recv().await {
///     match ev {
///         Event::Message(m) if m.kind == Kind::Gift => println!("gift {} from {}: {}", m.seq, m.user, m.body),
///         Event::Gap { room, from, to } => eprintln!("{room}: {from}..={to} lost"),
///         other => eprintln!("{other:?}"),
///     }
/// }
/// # client.close().await; Ok(()) }
/// ```
pub struct Client {
    cmds: mpsc::UnboundedSender<Command>,
    closed: watch::Sender<bool>,
    task: Option<JoinHandle<()>>,
}

/// The client's events, in order. A [`Stream`]; or call [`Events::recv`].
pub struct Events {
    rx: mpsc::Receiver<Event>,
}

impl Events {
    /// The next event; `None` once the client has stopped.
    pub async fn recv(&mut self) -> Option<Event> {
        self.rx.recv().await
    }
}

impl Stream for Events {
    type Item = Event;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Event>> {
        self.rx.poll_recv(cx)
    }
}

impl Client {
    /// Validates `config` and starts the client on the current tokio runtime.
    ///
    /// # Panics
    /// Outside a tokio runtime.
    pub fn start(config: Config) -> Result<(Client, Events), ConfigError> {
        config.validate()?;
        let (cmd_tx, cmd_rx) = mpsc::unbounded_channel();
        let (ev_tx, ev_rx) = mpsc::channel(config.event_capacity);
        let (closed_tx, closed_rx) = watch::channel(false);
        let mut http = reqwest::Client::builder()
            .timeout(config.connect_timeout)
            // One dispatch request per reconnect: no idle connections kept for it.
            .pool_max_idle_per_host(0);
        if let Some(tls) = &config.tls {
            // https dispatch trusts what the WebSocket trusts (a private CA, in tests).
            http = http.tls_backend_preconfigured((**tls).clone());
        }
        let http = http.build().map_err(|_| ConfigError::Bound("cannot build the HTTP client for dispatch"))?;
        let mut rooms = Rooms::default();
        if let Some(r) = &config.room {
            rooms.want_join(r, None);
        }
        let fixed = match &config.endpoint {
            Endpoint::Url(u) => Some(u.clone()),
            Endpoint::Dispatch(_) => None,
        };
        let driver = Driver {
            cfg: config,
            cmds: cmd_rx,
            events: ev_tx,
            closed: closed_rx,
            rooms,
            http,
            rng: fastrand::Rng::new(),
            attempt: 0,
            token: None,
            goaway: None,
            fixed,
        };
        let task = tokio::spawn(driver.run());
        Ok((Client { cmds: cmd_tx, closed: closed_tx, task: Some(task) }, Events { rx: ev_rx }))
    }

    fn send(&self, c: Command) -> Result<(), RequestError> {
        self.cmds.send(c).map_err(|_| RequestError::Closed)
    }

    /// Joins `room` (leaving the current one: a `switch`), from now on. A reconnect resumes it
    /// from the last message seen. Joining the room the client is already in does nothing.
    pub fn join(&self, room: impl Into<String>) -> Result<(), RequestError> {
        let room = room.into();
        validate_room(&room).map_err(RequestError::Room)?;
        self.send(Command::Join { room, from: None })
    }

    /// Joins `room` from a saved position: every must-deliver message after `from.seq` still in
    /// the room's history comes first (a `gap` says what is gone; a `reset` says the numbering
    /// changed since `from.epoch`).
    pub fn join_at(&self, room: impl Into<String>, from: Position) -> Result<(), RequestError> {
        let room = room.into();
        validate_room(&room).map_err(RequestError::Room)?;
        self.send(Command::Join { room, from: Some(from) })
    }

    /// Leaves the current room; the connection stays open.
    pub fn leave(&self) -> Result<(), RequestError> {
        self.send(Command::Leave)
    }

    /// Publishes to the current room over the connection (kinds the edge allows clients;
    /// `body` is JSON text, sent as is). Answered by [`Event::Published`] or an
    /// [`Event::Error`]. Not retried: use the publish API for must-deliver kinds.
    pub fn publish(&self, kind: impl Into<String>, body: impl Into<String>) -> Result<(), RequestError> {
        let (kind, body) = (kind.into(), body.into());
        validate_kind(&kind).map_err(RequestError::Kind)?;
        serde_json::from_str::<&RawValue>(&body).map_err(|e| RequestError::Body(e.to_string()))?;
        self.send(Command::Publish { kind, body })
    }

    /// Where the client stands in `room` (last seq seen and its epoch), to save and pass to
    /// [`Client::join_at`] later; `None` if it has no position there. Answered by the client's
    /// task between events: it waits while the application leaves events unread.
    pub async fn position(&self, room: impl Into<String>) -> Option<Position> {
        let (reply, rx) = oneshot::channel();
        self.send(Command::Position { room: room.into(), reply }).ok()?;
        rx.await.ok().flatten()
    }

    /// Closes the connection (WebSocket close 1000) and waits for the client's task to end.
    /// The last event is `State(Closed)` (if the application still reads).
    pub async fn close(mut self) {
        let _ = self.closed.send(true);
        if let Some(t) = self.task.take() {
            let _ = t.await;
        }
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        let _ = self.closed.send(true);
    }
}

/// How a connection ended.
enum End {
    /// The application closed the client.
    Stop,
    /// A `goaway`: reconnect through `url` at `at`.
    Goaway { url: String, at: Instant },
    /// Lost or closed by the edge.
    Lost(Retry),
}

/// How a connection attempt went.
enum Attempt {
    Open { ws: Box<Ws>, url: String, edge: Option<String> },
    Failed(Retry),
    Stop,
}

struct Driver {
    cfg: Config,
    cmds: mpsc::UnboundedReceiver<Command>,
    events: mpsc::Sender<Event>,
    closed: watch::Receiver<bool>,
    rooms: Rooms,
    http: reqwest::Client,
    rng: fastrand::Rng,
    /// Failed attempts since the last stable connection.
    attempt: u32,
    token: Option<Token>,
    /// A goaway's dispatch URL, for the next connection, and how often it failed.
    goaway: Option<(String, u32)>,
    /// The WebSocket URL of a fixed-URL client: the configured one until a goaway moves the
    /// client to another edge, which then becomes it (the one it had is going away).
    fixed: Option<String>,
}

fn now_unix() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64())
}

impl Driver {
    fn is_closed(&self) -> bool {
        *self.closed.borrow()
    }

    /// Hands an event to the application. False when the client should stop (closed, or the
    /// application dropped the stream).
    async fn emit(&mut self, ev: Event) -> bool {
        if self.is_closed() {
            return false;
        }
        tokio::select! {
            r = self.events.send(ev) => r.is_ok(),
            _ = self.closed.changed() => false,
        }
    }

    async fn emit_all(&mut self, evs: Vec<Event>) -> bool {
        for ev in evs {
            if !self.emit(ev).await {
                return false;
            }
        }
        true
    }

    async fn run(mut self) {
        let mut wait = Duration::ZERO;
        loop {
            if !wait.is_zero() && !self.idle(Instant::now() + wait).await {
                break;
            }
            if !self.emit(Event::State(ConnectionState::Connecting { attempt: self.attempt })).await {
                break;
            }
            let (ws, url, edge) = match self.connect().await {
                Attempt::Stop => break,
                Attempt::Failed(r) => {
                    wait = self.next_delay(r);
                    tracing::debug!(attempt = self.attempt, ?wait, ?r, "connect failed");
                    if !self.emit(Event::State(ConnectionState::Disconnected { retry_in: wait })).await {
                        break;
                    }
                    continue;
                }
                Attempt::Open { ws, url, edge } => (ws, url, edge),
            };
            tracing::debug!(%url, ?edge, "connected");
            if !self.emit(Event::State(ConnectionState::Connected { url, edge })).await {
                break;
            }
            let opened = Instant::now();
            match self.serve(*ws).await {
                End::Stop => break,
                End::Goaway { url, at } => {
                    // Moving off a draining edge is not a failure.
                    self.attempt = 0;
                    wait = at.saturating_duration_since(Instant::now());
                    tracing::debug!(%url, ?wait, "goaway: moving");
                    self.goaway = Some((url, 0));
                }
                End::Lost(r) if r.stop => {
                    tracing::debug!("disconnected by a moderator: not reconnecting");
                    break;
                }
                End::Lost(r) => {
                    if opened.elapsed() >= self.cfg.backoff.reset_after {
                        self.attempt = 0;
                    }
                    wait = self.next_delay(r);
                    tracing::debug!(?r, ?wait, "connection lost");
                }
            }
            if !self.emit(Event::State(ConnectionState::Disconnected { retry_in: wait })).await {
                break;
            }
        }
        // The application may have stopped reading: do not wait for room in the channel.
        let _ = self.events.try_send(Event::State(ConnectionState::Closed));
    }

    fn next_delay(&mut self, r: Retry) -> Duration {
        if r.new_token {
            self.token = None;
        }
        if r.protocol {
            self.attempt = self.attempt.max(PROTOCOL_ERROR_ATTEMPT);
        }
        let d = self.cfg.backoff.delay(self.attempt, self.rng.f64(), r.floor);
        self.attempt = self.attempt.saturating_add(1);
        d
    }

    /// Waits until `until`, applying the application's requests. False: stop.
    async fn idle(&mut self, until: Instant) -> bool {
        loop {
            tokio::select! {
                () = sleep_until(until) => return true,
                _ = self.closed.changed() => return false,
                cmd = self.cmds.recv() => match cmd {
                    None => return false,
                    Some(Command::Join { room, from }) => { self.rooms.want_join(&room, from); }
                    Some(Command::Leave) => { self.rooms.want_leave(); }
                    Some(Command::Position { room, reply }) => { let _ = reply.send(self.rooms.position(&room)); }
                    Some(Command::Publish { .. }) => {
                        let e = ErrorEvent::Request("publish: not connected".into());
                        if !self.emit(Event::Error(e)).await {
                            return false;
                        }
                    }
                },
            }
        }
    }

    /// Token, dispatch, upgrade.
    async fn connect(&mut self) -> Attempt {
        if let Some(src) = self.cfg.token.clone()
            && self.token.as_ref().is_none_or(|t| t.stale(now_unix(), TOKEN_STALE_MARGIN))
        {
            let got = tokio::select! {
                r = timeout(self.cfg.connect_timeout, src.fetch()) => r,
                _ = self.closed.changed() => return Attempt::Stop,
            };
            match got {
                Ok(Ok(v)) => self.token = Some(Token::new(v)),
                Ok(Err(e)) => return self.fail(ErrorEvent::Token(e.to_string()), Retry::default()).await,
                Err(_) => return self.fail(ErrorEvent::Token("timed out".into()), Retry::default()).await,
            }
        }
        let (params, left) = self.rooms.on_connect();
        if !self.emit_all(left).await {
            return Attempt::Stop;
        }
        let room = params.as_ref().map(|p| p.room.clone());
        // Where: a goaway's dispatch, the configured dispatch, or the fixed URL.
        let via_goaway = self.goaway.clone();
        let dispatch = match (&via_goaway, &self.cfg.endpoint) {
            (Some((u, _)), _) => Some(u.clone()),
            (None, Endpoint::Dispatch(u)) => Some(u.clone()),
            (None, Endpoint::Url(_)) => None,
        };
        let (base, edge) = match dispatch {
            Some(d) => {
                let asked = tokio::select! {
                    r = Self::ask_dispatch(&self.http, &d, room.as_deref()) => r,
                    _ = self.closed.changed() => return Attempt::Stop,
                };
                match asked {
                    Ok(found) => found,
                    Err((e, retry)) => {
                        if let Some((u, tries)) = self.goaway.take()
                            && tries + 1 < GOAWAY_DISPATCH_TRIES
                        {
                            self.goaway = Some((u, tries + 1));
                        }
                        return self.fail(e, retry).await;
                    }
                }
            }
            None => (self.fixed.clone().unwrap_or_default(), None),
        };
        let url = match urls::ws_url(&base, params.as_ref()) {
            Ok(u) => u,
            Err(e) => {
                let e = ErrorEvent::Dispatch { status: 0, message: format!("unusable edge URL: {e}") };
                return self.fail(e, Retry { protocol: true, ..Retry::default() }).await;
            }
        };
        let mut req = match url.as_str().into_client_request() {
            Ok(r) => r,
            Err(e) => return self.fail(ErrorEvent::Transport(e.to_string()), Retry::default()).await,
        };
        let proto = self.cfg.encoding.token();
        req.headers_mut().insert("Sec-WebSocket-Protocol", HeaderValue::from_static(proto));
        if let Some(t) = &self.token
            && let Ok(v) = HeaderValue::from_str(&format!("Bearer {}", t.value))
        {
            req.headers_mut().insert("Authorization", v);
        }
        // wss:// with the configured roots (else tokio-tungstenite's: the webpki bundle).
        let connector = self.cfg.tls.clone().map(tokio_tungstenite::Connector::Rustls);
        let connecting = timeout(
            self.cfg.connect_timeout,
            tokio_tungstenite::connect_async_tls_with_config(req, None, true, connector),
        );
        let res = tokio::select! {
            r = connecting => r,
            _ = self.closed.changed() => return Attempt::Stop,
        };
        match res {
            Ok(Ok((ws, resp))) => {
                let got = resp.headers().get("Sec-WebSocket-Protocol").and_then(|v| v.to_str().ok());
                if got != Some(proto) {
                    let e = ErrorEvent::Refused { status: 101, body: format!("edge chose subprotocol {got:?}") };
                    return self.fail(e, Retry { protocol: true, ..Retry::default() }).await;
                }
                if via_goaway.is_some() {
                    self.goaway = None;
                    if self.fixed.is_some() {
                        self.fixed = Some(base);
                    }
                }
                Attempt::Open { ws: Box::new(ws), url: urls::redacted(&url), edge }
            }
            Ok(Err(tungstenite::Error::Http(resp))) => {
                let status = resp.status().as_u16();
                let retry_after = retry_after(resp.headers().get("Retry-After").and_then(|v| v.to_str().ok()));
                let body = resp.body().as_deref().map(String::from_utf8_lossy).unwrap_or_default().trim().to_owned();
                self.fail(ErrorEvent::Refused { status, body }, after_refusal(status, retry_after)).await
            }
            Ok(Err(e)) => self.fail(ErrorEvent::Transport(e.to_string()), Retry::default()).await,
            Err(_) => self.fail(ErrorEvent::Transport("connect timed out".into()), Retry::default()).await,
        }
    }

    async fn fail(&mut self, e: ErrorEvent, r: Retry) -> Attempt {
        if self.emit(Event::Error(e)).await { Attempt::Failed(r) } else { Attempt::Stop }
    }

    /// `GET <dispatch>?room=ROOM` -> (WebSocket URL, edge id).
    async fn ask_dispatch(
        http: &reqwest::Client,
        dispatch: &str,
        room: Option<&str>,
    ) -> Result<(String, Option<String>), (ErrorEvent, Retry)> {
        let fail = |status: u16, message: String, retry: Retry| (ErrorEvent::Dispatch { status, message }, retry);
        let url = urls::dispatch_request(dispatch, room)
            .map_err(|e| fail(0, e.to_string(), Retry { protocol: true, ..Retry::default() }))?;
        let resp = http.get(url).send().await.map_err(|e| fail(0, e.to_string(), Retry::default()))?;
        let status = resp.status().as_u16();
        let retry_after = retry_after(resp.headers().get("Retry-After").and_then(|v| v.to_str().ok()));
        let text = resp.text().await.map_err(|e| fail(status, e.to_string(), Retry::default()))?;
        if status != 200 {
            let retry = Retry { floor: retry_after.unwrap_or_default(), ..Retry::default() };
            return Err(fail(status, text.trim().to_owned(), retry));
        }
        let v: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| fail(status, format!("not JSON: {e}"), Retry::default()))?;
        let ws = v["url"].as_str().ok_or_else(|| fail(status, format!("no url in {text}"), Retry::default()))?;
        Ok((ws.to_owned(), v["edge"].as_str().map(str::to_owned)))
    }

    fn encode(&self, msg: &ClientMsg) -> WsMessage {
        match self.cfg.encoding {
            Encoding::Rkyv => match envelope::encode_client_rkyv(msg) {
                Ok(b) => WsMessage::binary(b),
                // Signalling is JSON text in both subprotocols.
                Err(_) => WsMessage::text(String::from_utf8_lossy(&envelope::encode_client_json(msg)).into_owned()),
            },
            // (Sse is refused by `Config::validate`: JSON text, as for Json.)
            Encoding::Json | Encoding::Sse => {
                WsMessage::text(String::from_utf8_lossy(&envelope::encode_client_json(msg)).into_owned())
            }
        }
    }

    async fn send_ws(&self, ws: &mut Ws, m: WsMessage) -> Result<(), String> {
        match timeout(self.cfg.liveness, ws.send(m)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err("send timed out".into()),
        }
    }

    fn refresh_deadline(&self) -> Option<Instant> {
        self.cfg.token.as_ref()?;
        let d = self.token.as_ref()?.refresh_in(now_unix(), self.cfg.refresh_before)?;
        Some(Instant::now() + d)
    }

    /// Runs one open connection until it ends.
    async fn serve(&mut self, mut ws: Ws) -> End {
        let liveness = self.cfg.liveness;
        let mut last_rx = Instant::now();
        let mut pinged = false;
        let mut close_code: Option<u16> = None;
        let mut closing: Option<Instant> = None;
        let mut goaway: Option<(String, Instant)> = None;
        let mut refresh_at = self.refresh_deadline();
        let mut refreshing: Option<crate::token::TokenFuture> = None;
        let mut sent_token: Option<String> = None;
        let far = || Instant::now() + Duration::from_secs(86_400 * 365);
        loop {
            let timer = match (&goaway, closing) {
                // The edge sent its close frame: it closes the TCP connection next; a peer
                // that does not is not waited for.
                (_, Some(by)) => by,
                (Some((_, at)), None) => *at,
                (None, None) if pinged => last_rx + liveness,
                (None, None) => last_rx + liveness / 2,
            };
            tokio::select! {
                biased;
                _ = self.closed.changed() => {
                    let frame = CloseFrame { code: CloseCode::Normal, reason: "".into() };
                    let _ = timeout(CLOSE_GRACE, ws.close(Some(frame))).await;
                    return End::Stop;
                }
                cmd = self.cmds.recv() => {
                    let msg = match cmd {
                        None => return End::Stop,
                        Some(Command::Join { room, from }) => self.rooms.want_join(&room, from),
                        Some(Command::Leave) => self.rooms.want_leave(),
                        Some(Command::Publish { kind, body }) => {
                            Some(ClientMsg::Publish { kind, user: String::new(), body })
                        }
                        Some(Command::Position { room, reply }) => {
                            let _ = reply.send(self.rooms.position(&room));
                            None
                        }
                    };
                    if let Some(m) = msg {
                        let frame = self.encode(&m);
                        if let Err(e) = self.send_ws(&mut ws, frame).await {
                            if !self.emit(Event::Error(ErrorEvent::Transport(e))).await {
                                return End::Stop;
                            }
                            return Self::lost(goaway, None);
                        }
                    }
                }
                frame = ws.next() => {
                    let msg = match frame {
                        Some(Ok(m)) => m,
                        Some(Err(e)) => {
                            if goaway.is_none() && close_code.is_none()
                                && !self.emit(Event::Error(ErrorEvent::Transport(e.to_string()))).await
                            {
                                return End::Stop;
                            }
                            return Self::lost(goaway, close_code);
                        }
                        None => return Self::lost(goaway, close_code),
                    };
                    last_rx = Instant::now();
                    pinged = false;
                    let decoded = match msg {
                        WsMessage::Text(t) => envelope::decode_json(t.as_bytes()),
                        WsMessage::Binary(b) => envelope::decode_rkyv(&b),
                        WsMessage::Close(f) => {
                            let (code, reason) = f.map_or((1005, String::new()), |f| (u16::from(f.code), f.reason.to_string()));
                            close_code = Some(code);
                            closing = Some(Instant::now() + CLOSE_GRACE);
                            // A close after a goaway is the drain's: expected, not an error.
                            if goaway.is_none()
                                && !self.emit(Event::Error(ErrorEvent::Closed { code, reason })).await
                            {
                                return End::Stop;
                            }
                            continue;
                        }
                        WsMessage::Ping(_) | WsMessage::Pong(_) | WsMessage::Frame(_) => continue,
                    };
                    let msg = match decoded {
                        Ok(m) => m,
                        Err(e) => {
                            if !self.emit(Event::Error(ErrorEvent::Decode(e.to_string()))).await {
                                return End::Stop;
                            }
                            // Resume with `since` elsewhere; the same frame again would fail the
                            // same way, so not at once.
                            let _ = timeout(CLOSE_GRACE, ws.close(None)).await;
                            return End::Lost(Retry { protocol: true, ..Retry::default() });
                        }
                    };
                    let mut evs = Vec::new();
                    match msg {
                        ServerMsg::Goaway { url, reason, reconnect_after_ms, .. } => {
                            let after = Duration::from_millis(u64::from(reconnect_after_ms));
                            let wait = goaway_delay(after, self.rng.f64());
                            goaway = Some((url.clone(), Instant::now() + wait));
                            evs.push(Event::Goaway { url, reason, reconnect_after: wait });
                        }
                        ServerMsg::Refreshed { exp, .. } => {
                            match (sent_token.take(), self.token.as_mut()) {
                                (Some(v), _) => self.token = Some(Token { value: v, exp: Some(exp) }),
                                (None, Some(t)) => t.exp = Some(exp),
                                (None, None) => {}
                            }
                            // At least REFRESH_RETRY between refreshes: a token callback that
                            // returns a token no newer than the last (a cache) would otherwise
                            // be asked again and again as expiry nears.
                            refresh_at =
                                self.refresh_deadline().map(|t| t.max(Instant::now() + REFRESH_RETRY));
                            evs.push(Event::Refreshed { exp });
                        }
                        ServerMsg::Error { code, message, .. } => {
                            match code.as_str() {
                                "bad_room" | "room_forbidden" | "join_refused" => self.rooms.join_refused(),
                                // Refused a join, or taken out of the room (a `left` follows):
                                // the client stops wanting the room.
                                "banned" => self.rooms.banned(),
                                "refresh_refused" => {
                                    sent_token = None;
                                    refresh_at = Some(Instant::now() + REFRESH_RETRY);
                                }
                                "token_expired" => self.token = None,
                                _ => {}
                            }
                            evs.push(Event::Error(ErrorEvent::Server { code, message }));
                        }
                        ServerMsg::Published { room, seq, ts_us, .. } => evs.push(Event::Published { room, seq, ts_us }),
                        other => self.rooms.on_server(other, &mut evs),
                    }
                    if !self.emit_all(evs).await {
                        return End::Stop;
                    }
                }
                () = sleep_until(timer) => {
                    if closing.is_some() {
                        return Self::lost(goaway, close_code);
                    }
                    if let Some((url, at)) = goaway.take() {
                        let frame = CloseFrame { code: CloseCode::Normal, reason: "".into() };
                        let _ = timeout(CLOSE_GRACE, ws.close(Some(frame))).await;
                        return End::Goaway { url, at };
                    }
                    if pinged {
                        let e = ErrorEvent::Transport(format!("nothing received for {liveness:?}: connection dead"));
                        if !self.emit(Event::Error(e)).await {
                            return End::Stop;
                        }
                        return End::Lost(Retry::default());
                    }
                    pinged = true;
                    if let Err(e) = self.send_ws(&mut ws, WsMessage::Ping(tokio_tungstenite::tungstenite::Bytes::default())).await {
                        if !self.emit(Event::Error(ErrorEvent::Transport(e))).await {
                            return End::Stop;
                        }
                        return End::Lost(Retry::default());
                    }
                }
                () = sleep_until(refresh_at.unwrap_or_else(far)), if refresh_at.is_some() && refreshing.is_none() => {
                    refresh_at = None;
                    if let Some(src) = &self.cfg.token {
                        refreshing = Some(src.fetch());
                    }
                }
                tok = async {
                    match refreshing.as_mut() {
                        Some(f) => f.await,
                        None => std::future::pending().await,
                    }
                } => {
                    refreshing = None;
                    match tok {
                        Ok(v) => {
                            let m = self.encode(&ClientMsg::Refresh { token: v.clone() });
                            sent_token = Some(v);
                            if let Err(e) = self.send_ws(&mut ws, m).await {
                                if !self.emit(Event::Error(ErrorEvent::Transport(e))).await {
                                    return End::Stop;
                                }
                                return End::Lost(Retry::default());
                            }
                        }
                        Err(e) => {
                            if !self.emit(Event::Error(ErrorEvent::Token(e.to_string()))).await {
                                return End::Stop;
                            }
                            refresh_at = Some(Instant::now() + REFRESH_RETRY);
                        }
                    }
                }
            }
        }
    }

    /// The connection is gone: after a goaway, move; else come back as the close code says.
    fn lost(goaway: Option<(String, Instant)>, close_code: Option<u16>) -> End {
        match goaway {
            Some((url, at)) => End::Goaway { url, at },
            None => End::Lost(after_close(close_code)),
        }
    }
}

/// A `Retry-After` header in seconds (the edge and dispatch send seconds, never dates).
fn retry_after(value: Option<&str>) -> Option<Duration> {
    value.and_then(|v| v.trim().parse::<u64>().ok()).map(Duration::from_secs)
}
