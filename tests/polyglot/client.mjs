// A SecureMsg client in another language: Node.js with @grpc/grpc-js, loading the
// contracts from protos/ only, doing its own crypto with node:crypto.
//
//   node tests/polyglot/client.mjs <ca.pem> <identity addr> <session addr> <relay addr>
//        <my user id> <peer user id> <ML-KEM-768 public key, base64>
//
// Node 20 has no ML-KEM, so the harness hands over a post-quantum public key; this
// client signs it with its own Ed25519 key like every other key. Progress goes to
// stdout as JSON lines; the exit status says whether everything worked.
import crypto from "node:crypto";
import fs from "node:fs";
import path from "node:path";
import { fileURLToPath } from "node:url";
import grpc from "@grpc/grpc-js";
import protoLoader from "@grpc/proto-loader";

const [caFile, identityAddr, sessionAddr, relayAddr, me, peer, pqKeyB64] = process.argv.slice(2);
const protos = path.join(path.dirname(fileURLToPath(import.meta.url)), "..", "..", "protos");
const load = (file) =>
  grpc.loadPackageDefinition(
    protoLoader.loadSync(path.join(protos, file), { includeDirs: [protos], keepCase: true, longs: Number, defaults: true }),
  );
const identityPkg = load("securemsg/identity/v1/identity_service.proto").securemsg.identity.v1;
const sessionPkg = load("securemsg/session/v1/session_service.proto").securemsg.session.v1;
const relayPkg = load("securemsg/relay/v1/relay_service.proto").securemsg.relay.v1;

const tls = grpc.credentials.createSsl(fs.readFileSync(caFile));
const identity = new identityPkg.IdentityService(identityAddr, tls);
const session = new sessionPkg.SessionService(sessionAddr, tls);
const relay = new relayPkg.RelayService(relayAddr, tls);

const say = (event, fields = {}) => console.log(JSON.stringify({ event, ...fields }));
const call = (client, method, request, metadata = new grpc.Metadata()) =>
  new Promise((resolve, reject) =>
    client[method](request, metadata, { deadline: Date.now() + 10_000 }, (err, reply) =>
      err ? reject(err) : resolve(reply),
    ),
  );
const rawPublic = (key) => key.export({ format: "der", type: "spki" }).subarray(-32);
const u32 = (n) => { const b = Buffer.alloc(4); b.writeUInt32BE(n); return b; };
const sign = (privateKey, ...parts) => crypto.sign(null, Buffer.concat(parts), privateKey);

const signing = crypto.generateKeyPairSync("ed25519");
const identityKey = crypto.generateKeyPairSync("x25519");
const signedPrekey = crypto.generateKeyPairSync("x25519");
const pqPublic = Buffer.from(pqKeyB64, "base64");
const spkPublic = rawPublic(signedPrekey.publicKey);

await call(identity, "RegisterUser", {
  user_id: me,
  alias: "Node Client",
  identity_key: rawPublic(identityKey.publicKey),
  verify_key: rawPublic(signing.publicKey),
  signed_prekey: { key_id: 1, public_key: spkPublic,
    signature: sign(signing.privateKey, Buffer.from("SecureMsg signed prekey v1\0"), u32(1), spkPublic) },
  pq_prekey: { key_id: 1, public_key: pqPublic,
    signature: sign(signing.privateKey, Buffer.from("SecureMsg pq prekey v1\0"), u32(1), pqPublic) },
  one_time_prekeys: [1, 2, 3].map((id) => ({ key_id: id, public_key: rawPublic(crypto.generateKeyPairSync("x25519").publicKey) })),
});
say("registered");

const challenge = await call(session, "CreateChallenge", { user_id: me });
const signature = sign(signing.privateKey, Buffer.from("SecureMsg login v1\0"), Buffer.from(me), Buffer.from("\0"), challenge.challenge);
const created = await call(session, "CreateSession", { user_id: me, challenge_id: challenge.challenge_id, signature, user_agent: "node-polyglot" });
const auth = new grpc.Metadata();
auth.add("authorization", `Bearer ${created.token}`);
say("logged_in");

const bundle = await call(identity, "GetKeyBundle", { user_id: peer }, auth);
await call(relay, "SendMessage", { recipient_id: peer, body: Buffer.from("hello from node") }, auth);
say("sent", { peer_fingerprint: bundle.bundle.fingerprint });

const deadline = Date.now() + 15_000;
while (Date.now() < deadline) {
  const fetched = await call(relay, "FetchMessages", { max_messages: 10 }, auth);
  if (fetched.messages.length > 0) {
    const message = fetched.messages[0];
    await call(relay, "AcknowledgeMessages", { message_ids: [message.message_id] }, auth);
    say("received", { from: message.sender_id, body: Buffer.from(message.body).toString() });
    process.exit(0);
  }
  await new Promise((resolve) => setTimeout(resolve, 200));
}
say("timeout");
process.exit(1);
