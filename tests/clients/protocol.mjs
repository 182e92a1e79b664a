// What the Node drivers share with run.py: one JSON object per line on stdout, commands one per
// line on stdin. See run.py for the whole protocol; in short:
//
//   stdout  {"kind":"ready"[, "origin":O]}   the driver can take `connect` (first line)
//           {"kind":"request","lastEventId":I|null}
//                                             the library opens a connection (I: the
//                                             Last-Event-ID it sends, where the driver can see it)
//           {"kind":"open"}                   the library reports an open stream
//           {"kind":"event","type":T,"data":D,"id":I}
//                                             the library hands an event to the application
//           {"kind":"error","message":M}      the library reports an error (reconnects, mostly)
//   stdin   connect <sse-url>                 start the client
//           quit                              stop (EOF too), exit 0
//
// Only loopback addresses are ever contacted.

import readline from 'node:readline';

export function emit(obj) {
  process.stdout.write(JSON.stringify(obj) + '\n');
}

export function log(name, message) {
  process.stderr.write(`${name}: ${message}\n`);
}

export function isLoopbackUrl(text) {
  let url;
  try {
    url = new URL(text);
  } catch {
    return false;
  }
  const host = url.hostname;
  return (
    (url.protocol === 'http:' || url.protocol === 'https:') &&
    (host === 'localhost' || host === '[::1]' || /^127\.\d{1,3}\.\d{1,3}\.\d{1,3}$/.test(host))
  );
}

// Calls `onConnect(url)` for `connect <url>` and `onQuit()` for `quit` or EOF.
export function commands(name, { onConnect, onQuit }) {
  const rl = readline.createInterface({ input: process.stdin, terminal: false });
  rl.on('line', (line) => {
    const [cmd, arg] = line.trim().split(/\s+/, 2);
    if (cmd === 'connect') {
      if (!isLoopbackUrl(arg)) {
        log(name, `refusing non-loopback url ${JSON.stringify(arg)}`);
        process.exit(2);
      }
      Promise.resolve(onConnect(arg)).catch((err) => {
        log(name, `connect failed: ${err.stack || err.message}`);
        process.exit(1);
      });
    } else if (cmd === 'quit') {
      onQuit();
    } else if (cmd) {
      log(name, `unknown command ${JSON.stringify(cmd)}`);
    }
  });
  rl.on('close', () => onQuit());
}
