/**
 * The server's exit codes, shared by the launcher and the server.
 * @module
 */

/** The configuration is invalid (the message names the variable). */
export const EXIT_CONFIG = 2;

/** The database is unreachable or not set up for logical replication. */
export const EXIT_DATABASE = 1;
