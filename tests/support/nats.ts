/**
 * Test support: a real `nats-server` with JetStream (file storage in a
 * temporary directory), which can be killed and started again on the same
 * port and store.
 * @module
 */

import { ChildProcess } from "./harness.ts";

/** Where Debian puts nats-server, or `NATS_SERVER`. */
export const NATS_SERVER = Deno.env.get("NATS_SERVER") ?? "/usr/sbin/nats-server";

/** Whether nats-server is installed here. */
export const hasNats = await Deno.stat(NATS_SERVER).then(() => true, () => false);

/** A nats-server with JetStream on a free loopback port. */
export class NatsServer implements AsyncDisposable {
  readonly port: number;
  readonly #store: string;
  #process: ChildProcess | undefined;

  private constructor(port: number, store: string) {
    this.port = port;
    this.#store = store;
  }

  /** Starts one with a fresh store. */
  static async start(): Promise<NatsServer> {
    const listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
    const port = (listener.addr as Deno.NetAddr).port;
    listener.close();
    const server = new NatsServer(port, await Deno.makeTempDir({ prefix: "pgds-nats-" }));
    await server.restart();
    return server;
  }

  /** The running nats-server's process id (for /proc readings in the benchmark). */
  get pid(): number {
    return this.#process!.pid;
  }

  /** `nats://127.0.0.1:<port>`. */
  get url(): string {
    return `nats://127.0.0.1:${this.port}`;
  }

  /** Starts it (again, on the same port and store) once it was stopped. */
  async restart(): Promise<void> {
    this.#process = await ChildProcess.spawn({
      name: "nats-server",
      command: NATS_SERVER,
      args: ["-js", "-sd", this.#store, "-a", "127.0.0.1", "-p", String(this.port)],
      env: {},
      ready: /(Server is ready)/,
    });
  }

  /** Kills it (SIGKILL: no clean shutdown). */
  async kill(): Promise<void> {
    await this.#process?.kill("SIGKILL");
    this.#process = undefined;
  }

  /** Stops it and removes its store. */
  async [Symbol.asyncDispose](): Promise<void> {
    await this.kill();
    await Deno.remove(this.#store, { recursive: true }).catch(() => {});
  }
}
