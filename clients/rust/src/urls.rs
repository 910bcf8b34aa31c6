//! Dispatch and WebSocket URLs: where to ask, where to connect, with which room and position.

use url::Url;

use crate::rooms::JoinParams;

/// Why a URL cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UrlError {
    /// Not a URL.
    #[error("bad URL {url:?}: {why}")]
    Parse {
        /// The URL as given.
        url: String,
        /// What is wrong with it.
        why: String,
    },
    /// A URL of the wrong scheme.
    #[error("URL {url:?} has scheme {scheme:?}; expected {expected}")]
    Scheme {
        /// The URL as given.
        url: String,
        /// The scheme it has.
        scheme: String,
        /// The schemes allowed.
        expected: &'static str,
    },
}

fn parse(s: &str) -> Result<Url, UrlError> {
    Url::parse(s).map_err(|e| UrlError::Parse { url: s.to_owned(), why: e.to_string() })
}

/// Replaces the query parameters named in `set` (removing any earlier value), keeping the others
/// in their order.
fn set_query(url: &mut Url, set: &[(&str, Option<&str>)]) {
    let keep: Vec<(String, String)> = url
        .query_pairs()
        .filter(|(k, _)| !set.iter().any(|(name, _)| k == name))
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect();
    url.set_query(None);
    let present: Vec<(&str, &str)> = set.iter().filter_map(|(k, v)| v.map(|v| (*k, v))).collect();
    if keep.is_empty() && present.is_empty() {
        return;
    }
    let mut q = url.query_pairs_mut();
    for (k, v) in &keep {
        q.append_pair(k, v);
    }
    for (k, v) in present {
        q.append_pair(k, v);
    }
}

/// The request to a dispatch endpoint (`http://HOST:PORT/v1/route`, or a bare base URL, to
/// which `/v1/route` is added) for `room`: its `room` parameter is set to the room (whatever a
/// `goaway` put there), or removed when the client is in no room.
pub(crate) fn dispatch_request(dispatch: &str, room: Option<&str>) -> Result<Url, UrlError> {
    let mut url = parse(dispatch)?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(UrlError::Scheme {
            url: dispatch.to_owned(),
            scheme: url.scheme().to_owned(),
            expected: "http(s)",
        });
    }
    if url.path().is_empty() || url.path() == "/" {
        url.set_path("/v1/route");
    }
    set_query(&mut url, &[("room", room)]);
    Ok(url)
}

/// The WebSocket URL to open: `base` (from dispatch or the configuration; `http(s)` becomes
/// `ws(s)`, an empty path `/ws`) with `room`, `since` and `epoch` set from `join` (and removed
/// when absent). The token travels in a header, not in the URL.
pub(crate) fn ws_url(base: &str, join: Option<&JoinParams>) -> Result<Url, UrlError> {
    let mut url = parse(base)?;
    let scheme = match url.scheme() {
        "ws" | "http" => "ws",
        "wss" | "https" => "wss",
        other => {
            return Err(UrlError::Scheme { url: base.to_owned(), scheme: other.to_owned(), expected: "ws(s)" });
        }
    };
    if url.scheme() != scheme {
        // Url refuses some scheme changes; rebuild from text when it does.
        if url.set_scheme(scheme).is_err() {
            let rest = &base[base.find(':').unwrap_or(0)..];
            url = parse(&format!("{scheme}{rest}"))?;
        }
    }
    if url.path().is_empty() || url.path() == "/" {
        url.set_path("/ws");
    }
    let since = join.and_then(|j| j.since).map(|s| s.to_string());
    let room = join.map(|j| j.room.as_str());
    // An epoch only makes sense with a since.
    let epoch = join.filter(|j| j.since.is_some()).and_then(|j| j.epoch.as_deref());
    set_query(&mut url, &[("room", room), ("since", since.as_deref()), ("epoch", epoch), ("token", None)]);
    Ok(url)
}

/// The URL for logs and events: without a `token` parameter.
pub(crate) fn redacted(url: &Url) -> String {
    let mut u = url.clone();
    if u.query_pairs().any(|(k, _)| k == "token") {
        set_query(&mut u, &[("token", Some("REDACTED"))]);
    }
    u.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn jp(room: &str, since: Option<u64>, epoch: Option<&str>) -> JoinParams {
        JoinParams { room: room.into(), since, epoch: epoch.map(str::to_owned) }
    }

    #[test]
    fn dispatch_gets_the_room() {
        // A goaway URL that already names a room (the edge's first room) is set to ours.
        assert_eq!(
            dispatch_request("http://10.0.0.1:8081/v1/route?room=other", Some("lobby")).unwrap().as_str(),
            "http://10.0.0.1:8081/v1/route?room=lobby"
        );
        // Without a room (older edges): added.
        assert_eq!(
            dispatch_request("http://d.example/v1/route", Some("a:b")).unwrap().as_str(),
            "http://d.example/v1/route?room=a%3Ab"
        );
        // Other parameters are kept; a bare base gets the route path.
        assert_eq!(
            dispatch_request("http://d.example?region=eu", Some("r")).unwrap().as_str(),
            "http://d.example/v1/route?region=eu&room=r"
        );
        assert_eq!(dispatch_request("http://d/v1/route?room=x", None).unwrap().as_str(), "http://d/v1/route");
        assert!(dispatch_request("ws://d/v1/route", None).is_err());
        assert!(dispatch_request("not a url", None).is_err());
    }

    #[test]
    fn ws_url_carries_room_since_epoch() {
        let u = ws_url("ws://127.0.0.1:9000/ws?room=lobby", Some(&jp("lobby", Some(41), Some("00ab")))).unwrap();
        assert_eq!(u.as_str(), "ws://127.0.0.1:9000/ws?room=lobby&since=41&epoch=00ab");
        // A fresh join: no since, no epoch, even if the base had them.
        let u = ws_url("ws://h/ws?since=3&epoch=x&room=old", Some(&jp("new", None, Some("e")))).unwrap();
        assert_eq!(u.as_str(), "ws://h/ws?room=new");
        // No room: none in the URL.
        assert_eq!(ws_url("ws://h/ws?room=r", None).unwrap().as_str(), "ws://h/ws");
        // http(s) bases and bare hosts.
        assert_eq!(ws_url("http://h:1", None).unwrap().as_str(), "ws://h:1/ws");
        assert_eq!(ws_url("https://h/ws", None).unwrap().as_str(), "wss://h/ws");
        // A token in the base never stays in the URL (it goes in a header).
        assert_eq!(ws_url("ws://h/ws?token=secret&x=1", None).unwrap().as_str(), "ws://h/ws?x=1");
        assert!(ws_url("ftp://h/ws", None).is_err());
    }

    #[test]
    fn redaction() {
        let u = Url::parse("ws://h/ws?room=r&token=abc").unwrap();
        assert_eq!(redacted(&u), "ws://h/ws?room=r&token=REDACTED");
    }
}
