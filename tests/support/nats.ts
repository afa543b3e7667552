/**
 * Test support: a real `nats-server` with JetStream (file storage in a
 * temporary directory), which can be killed and started again on the same
 * port and store.
 * @module
 */

import { connect } from "@nats-io/transport-node";
import { jetstreamManager } from "@nats-io/jetstream";
import { ChildProcess } from "./harness.ts";
import { poll } from "./deadline.ts";

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

/** A free loopback port. */
function freePort(): number {
  const listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const port = (listener.addr as Deno.NetAddr).port;
  listener.close();
  return port;
}

/** One node of a {@link NatsCluster}: its name, client port, cluster port and store. */
interface ClusterNode {
  name: string;
  port: number;
  clusterPort: number;
  store: string;
  process: ChildProcess | undefined;
}

/**
 * A JetStream cluster of nats-servers on loopback ports (routes between all
 * of them, file storage each); a node can be killed (-9) and started again.
 */
export class NatsCluster implements AsyncDisposable {
  readonly #nodes: ClusterNode[];

  private constructor(nodes: ClusterNode[]) {
    this.#nodes = nodes;
  }

  /** Starts `size` nodes named n0, n1, … with fresh stores. */
  static async start(size = 3): Promise<NatsCluster> {
    const nodes: ClusterNode[] = [];
    for (let i = 0; i < size; i++) {
      nodes.push({
        name: `n${i}`,
        port: freePort(),
        clusterPort: freePort(),
        store: await Deno.makeTempDir({ prefix: `pgds-nats-n${i}-` }),
        process: undefined,
      });
    }
    const cluster = new NatsCluster(nodes);
    try {
      // All at once: each waits for the others' routes before it says it is ready.
      await Promise.all(nodes.map((_, i) => cluster.restart(i)));
    } catch (error) {
      await cluster[Symbol.asyncDispose]();
      throw error;
    }
    return cluster;
  }

  /** Every node's `nats://127.0.0.1:<port>`, comma-separated (as `NATS_URL` takes them). */
  get url(): string {
    return this.#nodes.map((node) => `nats://127.0.0.1:${node.port}`).join(",");
  }

  /** The node names, n0 … */
  get names(): string[] {
    return this.#nodes.map((node) => node.name);
  }

  /** Waits until the cluster serves JetStream (its nodes have elected a meta leader). */
  async jetStreamReady(): Promise<void> {
    await poll(async () => {
      const nc = await connect({ servers: this.url.split(",") }).catch(() => undefined);
      if (nc === undefined) return false;
      try {
        await (await jetstreamManager(nc, { timeout: 2000 })).getAccountInfo();
        return true;
      } catch {
        return false;
      } finally {
        await nc.close();
      }
    }, "the NATS cluster to elect a JetStream meta leader");
  }

  /** The node leading JetStream stream `stream` (its raft group's leader), once it has one. */
  async leaderOf(stream: string): Promise<string> {
    return await poll(async () => {
      const nc = await connect({ servers: this.url.split(",") });
      try {
        const info = await (await jetstreamManager(nc, { timeout: 2000 })).streams.info(stream);
        return info.cluster?.leader;
      } catch {
        return undefined;
      } finally {
        await nc.close();
      }
    }, `a leader of JetStream stream ${stream}`);
  }

  /** Starts node `index` (again, on its ports and store). */
  async restart(index: number): Promise<void> {
    const node = this.#nodes[index];
    const routes = this.#nodes.filter((other) => other !== node)
      .map((other) => `nats://127.0.0.1:${other.clusterPort}`).join(",");
    node.process = await ChildProcess.spawn({
      name: `nats-server ${node.name}`,
      command: NATS_SERVER,
      args: [
        ...["-js", "-sd", node.store, "-a", "127.0.0.1", "-p", String(node.port)],
        ...["-n", node.name, "--cluster_name", "pgds"],
        ...["--cluster", `nats://127.0.0.1:${node.clusterPort}`, "--routes", routes],
      ],
      env: {},
      ready: /(Server is ready)/,
    });
  }

  /** Kills node `name` with SIGKILL. */
  async kill(name: string): Promise<void> {
    const node = this.#nodes.find((n) => n.name === name);
    if (node === undefined) throw new Error(`Cannot kill: no node "${name}"`);
    await node.process?.kill("SIGKILL");
    node.process = undefined;
  }

  /** Stops every node and removes the stores. */
  async [Symbol.asyncDispose](): Promise<void> {
    for (const node of this.#nodes) {
      await node.process?.kill("SIGKILL");
      node.process = undefined;
      await Deno.remove(node.store, { recursive: true }).catch(() => {});
    }
  }
}
