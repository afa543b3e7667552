/**
 * What can go wrong for a request, as the server's modules say it. They
 * throw these and never choose an HTTP status: the one mapper at the edge
 * (`http/error_mapper.ts`) decides every status a client sees. Messages are
 * written for the client and never carry a secret.
 * @module
 */

/** The request is malformed, or asks for something that cannot be done as asked (400). */
export class InvalidRequestError extends Error {
  /** Creates the error; `message` says what is wrong and, where it helps, what would be right. */
  constructor(message: string, options?: ErrorOptions) {
    super(message, options);
    this.name = "InvalidRequestError";
  }
}

/** The request carries no credential, or one that is not valid: expired, forged, for another audience (401). */
export class UnauthorizedError extends Error {
  /** Creates the error; `message` says which, and never contains the credential. */
  constructor(message: string, options?: ErrorOptions) {
    super(message, options);
    this.name = "UnauthorizedError";
  }
}

/** The credential is valid but not for this (403); or the server's role may not do what the request needs. */
export class ForbiddenError extends Error {
  /** Creates the error. */
  constructor(message: string, options?: ErrorOptions) {
    super(message, options);
    this.name = "ForbiddenError";
  }
}

/** What the request names does not exist: a slot, a stream, a table, a column (404). */
export class NotFoundError extends Error {
  /** Creates the error. */
  constructor(message: string, options?: ErrorOptions) {
    super(message, options);
    this.name = "NotFoundError";
  }
}

/** It exists, but its state forbids the request: already streamed, name taken, table changed (409). */
export class ConflictError extends Error {
  /** Creates the error. */
  constructor(message: string, options?: ErrorOptions) {
    super(message, options);
    this.name = "ConflictError";
  }
}

/** It existed and is gone for good: a released snapshot (410). */
export class GoneError extends Error {
  /** Creates the error. */
  constructor(message: string, options?: ErrorOptions) {
    super(message, options);
    this.name = "GoneError";
  }
}

/** The database or the server cannot serve it now; retrying later can work (503). */
export class UnavailableError extends Error {
  /** Creates the error. */
  constructor(message: string, options?: ErrorOptions) {
    super(message, options);
    this.name = "UnavailableError";
  }
}
