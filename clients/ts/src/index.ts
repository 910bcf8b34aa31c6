// roomcast-client: a browser and Node client for roomcast live rooms.
export { RoomcastClient } from "./client.js";
export type {
  ClientEvents,
  ClientOptions,
  ConnectedInfo,
  ConnectionState,
  DisconnectedInfo,
  EventTargetLike,
  FetchLike,
  GoawayInfo,
  Published,
  Scheduler,
  StateChange,
  TokenContext,
  WebSocketConstructor,
  WebSocketLike,
} from "./client.js";
export { RoomcastError } from "./errors.js";
export type { ErrorSource } from "./errors.js";
export { RoomTracker } from "./rooms.js";
export type { GapInfo, JoinedInfo, Position, ResetInfo, Resume, RoomEvent, RoomMessage } from "./rooms.js";
export { backoffDelay, goawayDelay, parseRetryAfter } from "./backoff.js";
export type { BackoffOptions } from "./backoff.js";
export { buildWsUrl, goawayTarget, normalizeDispatch, routeRequestUrl } from "./urls.js";
export type { Target, WsParams } from "./urls.js";
export { CLIENT_FAULT_CODES, CloseCode, DELETED_KIND, SUBPROTOCOL, deletedSeq, parseServerMsg } from "./protocol.js";
export type { ClientMsg, PushMessage, ServerMsg } from "./protocol.js";
export { jwtExp, refreshDelay } from "./token.js";
