// A partner's Node client (Node 18 or later), as partners write it: https.request with the client certificate and key
// as PEM (key/cert/ca options) and the provider's server CA.  Run by the test suite once per proxy mode:
//
//   node partner_client.mjs CASES.json
//
// CASES.json is a list of {"name", "port", "path", "cert", "key", "ca", "maxVersion"} (file paths; maxVersion
// "TLSv1.2" or "TLSv1.3").  Each case is one GET on a new connection (agent: false), run one after the other.
// Output: one JSON line per case, {"name", "status", "protocol", "body"} (protocol e.g. "TLSv1.3") or
// {"name", "error": {"code", "message"}}.

import { readFileSync } from "node:fs";
import https from "node:https";

function get(c) {
  return new Promise((resolve) => {
    const req = https.request({
      host: "localhost",
      port: c.port,
      path: c.path,
      method: "GET",
      agent: false,
      key: readFileSync(c.key),
      cert: readFileSync(c.cert),
      ca: readFileSync(c.ca),
      maxVersion: c.maxVersion,
      timeout: 20000,
    }, (res) => {
      const chunks = [];
      res.on("data", (d) => chunks.push(d));
      const protocol = res.socket.getProtocol();  // read now: the socket is gone after "end"
      res.on("end", () => resolve({ name: c.name, status: res.statusCode, protocol,
                                    body: Buffer.concat(chunks).toString("utf8") }));
      res.on("error", (err) => resolve({ name: c.name, error: { code: err.code ?? null, message: err.message } }));
    });
    req.on("timeout", () => req.destroy(new Error("timed out")));
    req.on("error", (err) => resolve({ name: c.name, error: { code: err.code ?? null, message: err.message } }));
    req.end();
  });
}

const cases = JSON.parse(readFileSync(process.argv[2], "utf8"));
for (const c of cases) {
  process.stdout.write(JSON.stringify(await get(c)) + "\n");
}
