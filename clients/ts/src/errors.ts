/** Where an error came from. */
export type ErrorSource =
  /** An `error` envelope from the edge (`code` is the protocol's: `bad_room`, `room_forbidden`, ...). */
  | "server"
  /** The edge closed the connection with a code that says why (`code` is `close_<n>`). */
  | "close"
  /** The WebSocket upgrade failed (`code` is `handshake` or `http_<status>` when it is known). */
  | "handshake"
  /** The dispatch endpoint failed (`code` is `dispatch` or `http_<status>`). */
  | "dispatch"
  /** The app's token callback threw or refresh failed. */
  | "token"
  /** The connection went silent past the liveness bound (`code` is `dead_connection`). */
  | "liveness"
  /** A publish over the socket failed. */
  | "publish";

export class RoomcastError extends Error {
  override readonly name = "RoomcastError";
  constructor(
    readonly code: string,
    message: string,
    readonly source: ErrorSource,
    /** The WebSocket close code, for `source: "close"`. */
    readonly closeCode?: number,
    /** The HTTP status, when one is known. */
    readonly status?: number,
  ) {
    super(message);
  }
}
