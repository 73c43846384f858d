// The kit must run in browsers: bundled for the browser it pulls in nothing
// but its own source, protobuf-es and connect-es, and no Node built-in.
import assert from "node:assert/strict";
import { test } from "node:test";
import { fileURLToPath } from "node:url";
import { build } from "esbuild";

test("bundles for the browser with connect-es and protobuf-es only", { timeout: 60_000 }, async () => {
  const result = await build({
    entryPoints: [fileURLToPath(new URL("../src/index.ts", import.meta.url))],
    absWorkingDir: fileURLToPath(new URL("..", import.meta.url)),
    bundle: true,
    write: false,
    platform: "browser",
    format: "esm",
    minify: true,
    metafile: true,
    logLevel: "silent",
  });
  const packages = new Set(
    Object.keys(result.metafile.inputs).map((path) => {
      const m = /node_modules\/((?:@[^/]+\/)?[^/]+)\//.exec(path);
      return m?.[1] ?? path.split("/")[0];
    }),
  );
  assert.deepEqual([...packages].sort(), ["@bufbuild/protobuf", "@connectrpc/connect", "src"]);
  const bytes = result.outputFiles[0]?.contents.length ?? 0;
  assert.ok(bytes > 0 && bytes < 200_000, `${bytes} bytes minified`);
});
