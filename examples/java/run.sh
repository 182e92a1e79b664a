#!/usr/bin/env bash
# Builds and runs examples/java with Debian's grpc-java, protobuf and netty jars: no Maven
# Central, no build tool. Needs (Debian bookworm):
#
#   apt-get install libgrpc-java libprotobuf-java protobuf-compiler \
#     protobuf-compiler-grpc-java-plugin libnetty-java libperfmark-java   # + a JDK >= 17
#
# Usage: [SSEGATE_API_KEY=...] [SSEGATE_GRPC_URL=http://127.0.0.1:50051] [SSEGATE_USER=alice] \
#          examples/java/run.sh
# (no SSEGATE_API_KEY: no authorization header, for a server run with --insecure-open-publish)
#
# Generated code and classes go to a temporary directory (under $TMPDIR), removed when the
# example ends: nothing is written into the source tree. With Maven or Gradle, see README.md
# instead.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"

die() { printf 'examples/java/run.sh: error: %s\n' "$*" >&2; exit 1; }

# The runtime classpath: grpc-java 1.41 and what it needs, as Debian installs them.
jars=(
  grpc-api grpc-context grpc-core grpc-netty grpc-protobuf grpc-protobuf-lite grpc-stub
  protobuf guava perfmark-api error_prone_annotations jsr305
  geronimo-annotation-1.3-spec # javax.annotation.Generated, used by the generated stubs
  netty-buffer netty-codec netty-codec-http netty-codec-http2 netty-codec-socks netty-common
  netty-handler netty-handler-proxy netty-resolver netty-transport
)
classpath=""
for jar in "${jars[@]}"; do
  [ -f "/usr/share/java/$jar.jar" ] || die "/usr/share/java/$jar.jar is missing (see the apt-get line at the top of this file)"
  classpath+="/usr/share/java/$jar.jar:"
done
for tool in protoc javac java; do
  command -v "$tool" >/dev/null 2>&1 || die "$tool is not installed"
done
[ -x /usr/bin/grpc_java_plugin ] || die "/usr/bin/grpc_java_plugin is missing (apt-get install protobuf-compiler-grpc-java-plugin)"

# Rebuild from scratch each time, in a directory of its own: a few seconds, never a stale
# class, and nothing left behind.
out="$(mktemp -d "${TMPDIR:-/tmp}/ssegate-java-example.XXXXXX")"
trap 'rm -rf "$out"' EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
mkdir -p "$out/gen" "$out/classes"
# -I is the root the proto's own path is relative to (ssegate/v1/publisher.proto).
protoc -I "$root/proto" \
  --java_out="$out/gen" \
  --grpc-java_out="$out/gen" \
  --plugin=protoc-gen-grpc-java=/usr/bin/grpc_java_plugin \
  ssegate/v1/publisher.proto
mapfile -t sources < <(find "$out/gen" "$here/src/main/java" -name '*.java')
javac -nowarn -encoding UTF-8 --release 17 -cp "$classpath" -d "$out/classes" "${sources[@]}"
# Not exec: the EXIT trap removes the classes once java is done, and passes on its status.
java -cp "$out/classes:$classpath" io.ssegate.example.PublishExample
