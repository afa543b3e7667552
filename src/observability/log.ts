/**
 * The server's log: one line per event that matters, as readable text or,
 * with `LOG_FORMAT=json`, one JSON object per line; lines below `LOG_LEVEL`
 * are dropped. Every line names its event (`stream.created`,
 * `consumer.connected`, …) so that operators can filter on it. Credentials
 * are never written: callers pass what a token proved, not the token.
 * @module
 */

import { EventLog } from "./event_log.ts";

/** Severity of a log line, lowest first. */
export type LogLevel = "debug" | "info" | "warn" | "error";

/** How lines are written. */
export type LogFormat = "text" | "json";

/** Values a line carries beside its message. */
export type LogFields = Record<string, string | number | boolean | null | undefined>;

/** The levels, lowest first. */
export const LOG_LEVELS: readonly LogLevel[] = ["debug", "info", "warn", "error"];

/** Where lines go: stdout below `warn`, stderr from it; replaced in tests. */
export type LogSink = (level: LogLevel, line: string) => void;

const consoleSink: LogSink = (level, line) =>
  level === "warn" || level === "error" ? console.error(line) : console.log(line);

/** Text form of a field value: bare when it has no spaces or quotes, JSON-quoted otherwise. */
function textValue(value: string | number | boolean | null): string {
  const text = String(value);
  return typeof value === "string" && /[\s"=]/.test(text) ? JSON.stringify(text) : text;
}

/** A logger of events with fields. */
export class Logger {
  #threshold = 1;
  #format: LogFormat = "text";
  #sink: LogSink = consoleSink;
  /** The lines at `info` and above, kept whatever the level written: `GET /v2/events`. */
  readonly events: EventLog = new EventLog();

  /** Sets the format, the lowest level written, and (for tests) where lines go. */
  configure(options: { format?: LogFormat; level?: LogLevel; sink?: LogSink }): void {
    if (options.format !== undefined) this.#format = options.format;
    if (options.level !== undefined) this.#threshold = LOG_LEVELS.indexOf(options.level);
    if (options.sink !== undefined) this.#sink = options.sink;
  }

  /** Whether lines of `level` are written. */
  enabled(level: LogLevel): boolean {
    return LOG_LEVELS.indexOf(level) >= this.#threshold;
  }

  /** Writes `event` with `message` and `fields` at `level`. */
  write(level: LogLevel, event: string, message: string, fields: LogFields = {}): void {
    if (level === "debug" && !this.enabled(level)) return;
    const time = new Date().toISOString();
    const defined = Object.entries(fields).filter(([, v]) => v !== undefined) as [
      string,
      string | number | boolean | null,
    ][];
    if (level !== "debug") {
      this.events.add({ time, level, event, message, fields: Object.fromEntries(defined) });
    }
    if (!this.enabled(level)) return;
    if (this.#format === "json") {
      this.#sink(
        level,
        JSON.stringify({ time, level, event, msg: message, ...Object.fromEntries(defined) }),
      );
      return;
    }
    const extra = defined.map(([k, v]) => ` ${k}=${textValue(v)}`).join("");
    this.#sink(level, `${time} ${level.padEnd(5)} ${event}: ${message}${extra}`);
  }

  /** Detail for debugging. */
  debug(event: string, message: string, fields?: LogFields): void {
    this.write("debug", event, message, fields);
  }

  /** Something that happened as it should. */
  info(event: string, message: string, fields?: LogFields): void {
    this.write("info", event, message, fields);
  }

  /** Something an operator should look at. */
  warn(event: string, message: string, fields?: LogFields): void {
    this.write("warn", event, message, fields);
  }

  /** Something failed. */
  error(event: string, message: string, fields?: LogFields): void {
    this.write("error", event, message, fields);
  }
}

/** The server's log. */
export const log: Logger = new Logger();

/** The message of `error`, for a log field. */
export function errorMessage(error: unknown): string {
  return error instanceof Error ? error.message : String(error);
}
