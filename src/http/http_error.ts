/**
 * The one error type handlers throw to answer a client. The edge mapper in
 * `server.ts` turns it into `{"error": message}` with its status; any other
 * error becomes a 500 whose details stay in the server log.
 * @module
 */

/** An error whose message is safe to show the client, with the HTTP status to answer. */
export class HttpError extends Error {
  /** The HTTP status code of the response. */
  readonly status: number;
  /** Extra response headers, e.g. `Allow` on a 405. */
  readonly headers: Record<string, string>;

  /** Creates an error answered with `status` and `{"error": message}`. */
  constructor(status: number, message: string, headers: Record<string, string> = {}) {
    super(message);
    this.name = "HttpError";
    this.status = status;
    this.headers = headers;
  }
}
