/**
 * Mutual authentication and session keys of the store protocol (version 2).
 *
 *   client -> HELLO     { versions, vm, generation, role, nonce Nc }
 *   store  -> CHALLENGE { version, nonce Ns }
 *   client -> AUTH      { proof = HMAC(kClientProof, "client-proof" || T) }
 *   store  -> WELCOME   { ..., proof = HMAC(kServerProof, "server-proof" || T) }   (first tagged frame)
 *
 * T = SHA-256 over the exact HELLO and CHALLENGE payload bytes, so both nonces,
 * the client's claimed role, VM and generation and the negotiated version are
 * bound to both proofs: a genuine AUTH cannot be spliced onto another HELLO, and
 * a recorded one is worthless against a new Ns. Keys come from
 * HKDF-SHA256(ikm = shared secret, salt = Nc || Ns, info = label || T).
 *
 * The client proves first, so a peer that merely connects to the store never
 * obtains a value computed from the secret (nor makes the store compute more
 * than one HKDF). A fake store does get the client's proof, which is why the
 * secret must be long and random (the store generates 32 random bytes).
 */
import { createHash, createHmac, hkdfSync, randomBytes, timingSafeEqual } from 'node:crypto';

export const NONCE_SIZE = 32;
const KEYS_LABEL = 'hydravm-store-v2 session keys';

export function makeNonce(): Buffer {
  return randomBytes(NONCE_SIZE);
}

export interface SessionKeys {
  /** The client's AUTH proof. */
  clientProof: Buffer;
  /** The store's WELCOME proof. */
  serverProof: Buffer;
  /** Tag key of frames client -> store. */
  clientToServer: Buffer;
  /** Tag key of frames store -> client. */
  serverToClient: Buffer;
}

/** Hash of the handshake so far (length-prefixed so the two payloads cannot be re-split). */
export function transcriptHash(hello: Buffer, challenge: Buffer): Buffer {
  const len = (b: Buffer) => {
    const l = Buffer.allocUnsafe(4);
    l.writeUInt32BE(b.length);
    return l;
  };
  return createHash('sha256').update('hydravm-store-v2 transcript').update(len(hello)).update(hello).update(len(challenge)).update(challenge).digest();
}

/** Both sides compute the same keys from the shared secret, both nonces and both handshake payloads. */
export function deriveSession(secret: string, clientNonce: Buffer, serverNonce: Buffer, hello: Buffer, challenge: Buffer): SessionKeys {
  const t = transcriptHash(hello, challenge);
  const okm = Buffer.from(hkdfSync('sha256', Buffer.from(secret, 'utf8'), Buffer.concat([clientNonce, serverNonce]), Buffer.concat([Buffer.from(KEYS_LABEL, 'latin1'), t]), 128));
  const proof = (key: Buffer, label: string) => createHmac('sha256', key).update(label).update(t).digest();
  return {
    clientProof: proof(okm.subarray(0, 32), 'client-proof'),
    serverProof: proof(okm.subarray(32, 64), 'server-proof'),
    clientToServer: okm.subarray(64, 96),
    serverToClient: okm.subarray(96, 128),
  };
}

/** Constant-time comparison of a received proof with the expected one. */
export function proofMatches(expected: Buffer, received: Buffer): boolean {
  return received.length === expected.length && timingSafeEqual(received, expected);
}
