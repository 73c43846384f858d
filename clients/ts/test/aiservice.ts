// Builds and runs the Go example server (examples/aiservice) for the
// integration tests: one build per test process, servers on free loopback
// ports, each stopped by its PID.
import { spawn, execFile, type ChildProcess } from "node:child_process";
import { mkdtemp, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join, resolve } from "node:path";
import { createInterface } from "node:readline";
import { fileURLToPath } from "node:url";
import { promisify } from "node:util";

const repoRoot = resolve(fileURLToPath(new URL(".", import.meta.url)), "../../..");

/** A running example server. */
export interface Server {
  /** url is the server's base URL, http://127.0.0.1:PORT. */
  readonly url: string;
  /** stderr holds what the server logged so far, for failure messages. */
  readonly stderr: string[];
  /** stop ends the server and waits for it to exit. */
  stop(): Promise<void>;
}

/** Servers builds the example once into a temporary directory and starts instances of it. */
export class Servers {
  private dir: string | undefined;
  private binary: string | undefined;
  private readonly running: Server[] = [];

  /** build compiles examples/aiservice; it takes seconds with a warm Go build cache. */
  async build(): Promise<void> {
    this.dir = await mkdtemp(join(tmpdir(), "connectlimit-ts-"));
    this.binary = join(this.dir, "aiservice");
    await promisify(execFile)("go", ["build", "-o", this.binary, "./examples/aiservice"], {
      cwd: repoRoot,
      timeout: 300_000,
    });
  }

  /** start runs the example with the given configuration and chunk delay, and waits until it serves. */
  async start(name: string, configYAML: string, chunkDelay = "0s"): Promise<Server> {
    if (this.binary === undefined || this.dir === undefined) {
      throw new Error("build first");
    }
    const config = join(this.dir, `${name}.yaml`);
    await writeFile(config, configYAML);
    const child = spawn(this.binary, ["-addr", "127.0.0.1:0", "-chunk-delay", chunkDelay, "-config", config], {
      stdio: ["ignore", "ignore", "pipe"],
    });
    const stderr: string[] = [];
    const url = await new Promise<string>((resolveURL, reject) => {
      const timer = setTimeout(() => reject(new Error(`${name}: no url= line within 60s:\n${stderr.join("\n")}`)), 60_000);
      const lines = createInterface({ input: child.stderr! });
      lines.on("line", (line) => {
        stderr.push(line);
        const m = /\burl=(http:\/\/\S+)/.exec(line);
        if (m?.[1] !== undefined) {
          clearTimeout(timer);
          resolveURL(m[1]);
        }
      });
      child.once("exit", (code, signal) => {
        clearTimeout(timer);
        reject(new Error(`${name}: exited (${code ?? signal}) before serving:\n${stderr.join("\n")}`));
      });
      child.once("error", (e) => {
        clearTimeout(timer);
        reject(e);
      });
    });
    const server: Server = { url, stderr, stop: () => stop(child) };
    this.running.push(server);
    return server;
  }

  /** close stops every server started and removes the build. */
  async close(): Promise<void> {
    await Promise.all(this.running.map((s) => s.stop()));
    if (this.dir !== undefined) {
      await rm(this.dir, { recursive: true, force: true });
    }
  }
}

function stop(child: ChildProcess): Promise<void> {
  if (child.exitCode !== null || child.signalCode !== null) {
    return Promise.resolve();
  }
  return new Promise((done) => {
    const kill = setTimeout(() => child.kill("SIGKILL"), 15_000);
    child.once("exit", () => {
      clearTimeout(kill);
      done();
    });
    child.kill("SIGTERM");
  });
}
