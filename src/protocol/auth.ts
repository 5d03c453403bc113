/**
 * Challenge/response authentication: the server sends a random 32-byte nonce
 * (CHALLENGE), the client answers HMAC-SHA256(key = cluster shared secret,
 * message = "hydravm-store-auth-v1" || nonce) (AUTH). The secret never
 * crosses the wire; a fresh nonce per connection defeats replay.
 */
import { createHmac, randomBytes, timingSafeEqual } from 'node:crypto';

const LABEL = Buffer.from('hydravm-store-auth-v1', 'latin1');

export function makeNonce(): Buffer {
  return randomBytes(32);
}

export function authResponse(secret: string, nonce: Buffer): Buffer {
  return createHmac('sha256', secret).update(LABEL).update(nonce).digest();
}

export function verifyAuth(secret: string, nonce: Buffer, response: Buffer): boolean {
  const expected = authResponse(secret, nonce);
  return response.length === expected.length && timingSafeEqual(response, expected);
}
