// Builds the browser demo of examples/aiservice: bundles
// examples/aiservice/web/src/main.ts, with this kit's source (as
// @connectlimit/client), connect-web and protobuf-es from this package's
// node_modules, into examples/aiservice/web/static/app.js, which the example
// embeds and serves. The output is committed, so it must be reproducible:
// esbuild is pinned in package-lock.json, and the bundle is minified with no
// source map, banner or path in it.
//
//   npm run build:demo              # write app.js
//   npm run build:demo -- --check   # fail if app.js is not what the sources build
import { readFile, writeFile } from "node:fs/promises";
import { relative } from "node:path";
import { fileURLToPath } from "node:url";
import { build } from "esbuild";

const kit = fileURLToPath(new URL("..", import.meta.url));
const repo = fileURLToPath(new URL("../../..", import.meta.url));
const web = `${repo}examples/aiservice/web`;
const out = `${web}/static/app.js`;

const result = await build({
  entryPoints: [`${web}/src/main.ts`],
  absWorkingDir: repo,
  bundle: true,
  write: false,
  platform: "browser",
  format: "esm",
  target: "es2022",
  minify: true,
  sourcemap: false,
  legalComments: "none",
  charset: "utf8",
  tsconfig: `${web}/tsconfig.json`,
  alias: { "@connectlimit/client": `${kit}src` },
  nodePaths: [`${kit}node_modules`],
  logLevel: "warning",
});
const bundle = result.outputFiles[0]?.contents;
if (bundle === undefined) {
  throw new Error("esbuild produced no output");
}
const name = relative(process.cwd(), out);
if (process.argv.includes("--check")) {
  const committed = await readFile(out).catch(() => Buffer.alloc(0));
  if (!committed.equals(bundle)) {
    console.error(`${name} is not what its sources build; run: npm run build:demo (in clients/ts), and commit it`);
    process.exit(1);
  }
  console.log(`${name} is up to date (${bundle.length} bytes)`);
} else {
  await writeFile(out, bundle);
  console.log(`wrote ${name} (${bundle.length} bytes)`);
}
