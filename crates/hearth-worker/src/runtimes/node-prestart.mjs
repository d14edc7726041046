// hearth Node.js runtime, started ahead of demand. `/var/runtime/prestart` starts `node` on this
// module with the flags `/var/runtime/bootstrap` would give it for the memory size the sandbox
// was made for (its AWS_LAMBDA_FUNCTION_MEMORY_SIZE sizes V8's heap, which cannot be resized
// later), and the runtime interface client's entry as the argument. Before any function is
// known it loads what does not depend on one: node itself, the built-in modules the client
// uses and the client's native addon. The agent then hands over one function's environment and
// this process becomes that function's runtime as the bootstrap would have started it: the same
// flags, NODE_PATH, working directory and arguments. The client itself loads only then: it
// reads the function's environment as it loads.
//
// Protocol with the agent (the Python prestart's): "r" on fd 4 once loaded; fd 3 then carries
// the function's environment (NUL-terminated KEY=VALUE entries, then end of file); the answer
// on fd 4 is "y" (this process becomes the runtime) or "n" and the reason (it exits, and the
// agent starts the bootstrap instead). It declines whenever it could not behave exactly like a
// freshly started node: a variable it started with has another value (the memory size among
// them), or the function sets one that node, libuv, OpenSSL or the C library read only when a
// process starts.
import fs from "node:fs";
import { createRequire } from "node:module";
import path from "node:path";
import { pathToFileURL } from "node:url";

const STARTUP_ONLY_PREFIXES = ["NODE_", "UV_", "LD_", "MALLOC_", "OPENSSL_", "SSL_CERT_", "LC_"];
const STARTUP_ONLY_NAMES = new Set([
  "SHLVL", // the bootstrap's shell passes on its own reading of it
  "LANGUAGE",
  "GLIBC_TUNABLES",
  "HOME", // node's global module paths are made from it at start
  "AWS_LAMBDA_EXEC_WRAPPER", // the bootstrap runs the wrapper instead of node
  "AWS_LAMBDA_FUNCTION_MEMORY_SIZE", // sizes the heap: a sandbox made for no size declines
]);
// What the client loads from node; loading it here is what a started node would do anyway.
const BUILTINS = ["assert", "fs", "http", "module", "net", "os", "path", "util", "worker_threads"];

function readConfig(fd) {
  const env = {};
  for (const entry of fs.readFileSync(fd).toString("utf8").split("\0")) {
    if (!entry) continue;
    const eq = entry.indexOf("=");
    if (eq < 0) env[entry] = "";
    else env[entry.slice(0, eq)] = entry.slice(eq + 1);
  }
  return env;
}

// Read when used, not at start: node resets its time zone when TZ is assigned, and looks up
// PATH when it spawns a program.
const FOLLOWED = new Set(["TZ", "PATH"]);

// Set by the shell that starts node (here `prestart`, for a function the bootstrap): not the
// function's, and set below as the bootstrap's shell sets them.
const SHELL_MADE = new Set(["PWD", "OLDPWD", "SHLVL"]);

function refusal(env, startedWith) {
  for (const [k, v] of Object.entries(startedWith)) {
    if (env[k] !== v && !FOLLOWED.has(k) && !SHELL_MADE.has(k)) {
      return `${k} differs from the value this node started with`;
    }
  }
  for (const k of Object.keys(env)) {
    if (k in startedWith) continue;
    if (STARTUP_ONLY_NAMES.has(k) || STARTUP_ONLY_PREFIXES.some((p) => k.startsWith(p))) {
      return `${k} is only read when a process starts`;
    }
  }
  return null;
}

const client = process.argv[2];
const startedWith = { ...process.env };
const load = createRequire(client);
for (const name of BUILTINS) load(`node:${name}`);
// The addon sits beside the client's entry (aws-lambda-ric 4) or in its dist (3); the client
// requires it by the same path later and gets this module from the loader's cache.
for (const rel of ["rapid-client.node", "../dist/rapid-client.node"]) {
  const addon = path.resolve(path.dirname(client), rel);
  if (fs.existsSync(addon)) {
    load(addon);
    break;
  }
}
globalThis.gc?.();

fs.writeSync(4, "r");
const env = readConfig(3);
fs.closeSync(3);
// The bootstrap gives node Lambda's NODE_PATH unless the function sets one (this process
// started with Lambda's: the sandbox sets none).
if (!env.NODE_PATH && startedWith.NODE_PATH !== undefined) env.NODE_PATH = startedWith.NODE_PATH;
const taskRoot = env.LAMBDA_TASK_ROOT || "/var/task";
let why = refusal(env, startedWith);
if (why === null) {
  try {
    process.chdir(taskRoot);
  } catch (e) {
    why = `cannot enter ${taskRoot}: ${e.code ?? e}`;
  }
}
if (why !== null) {
  fs.writeSync(4, `n${why}`);
  process.exit(0);
}
fs.writeSync(4, "y");
fs.closeSync(4);

// The bootstrap's shell starts in the task root, enters it again and execs node: it exports
// PWD and OLDPWD as that directory and SHLVL as 0 (the function sets none: it would decline).
Object.assign(env, { PWD: taskRoot, OLDPWD: taskRoot, SHLVL: "0" });
for (const k of Object.keys(process.env)) delete process.env[k];
Object.assign(process.env, env);
process.argv.splice(1, process.argv.length - 1, client, env._HANDLER ?? "");
await import(pathToFileURL(client).href);
