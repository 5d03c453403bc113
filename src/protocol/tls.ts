/**
 * The optional TLS transport of the store protocol: the store's certificate and
 * key, the CAs a client trusts, and readable errors for the ways a TLS set-up
 * goes wrong. Clients take their CA from HYDRAVM_STORE_TLS_CA (a PEM file or a
 * directory of .pem/.crt files) unless given explicitly, so every process that
 * talks to the store (checkpointers, restores, HA agents) inherits one setting.
 */
import fs from 'node:fs';
import path from 'node:path';
import tls from 'node:tls';
import { StoreError } from '../errors.js';

export const TLS_CA_ENV = 'HYDRAVM_STORE_TLS_CA';
export const TLS_SERVERNAME_ENV = 'HYDRAVM_STORE_TLS_SERVERNAME';

export interface StoreTlsServerOptions {
  /** PEM certificate (chain) file of the store. */
  certFile: string;
  /** PEM private key file of the store. */
  keyFile: string;
}

export interface StoreTlsClientOptions {
  /** PEM file, or a directory of .pem/.crt files, with the CA(s) that signed the store's certificate. */
  ca: string;
  /** Name the certificate must carry (default: the host of the store address, a DNS name or an IP). */
  servername?: string;
}

/** The store's TLS context, or a clear error naming the unreadable or unusable file. */
export function serverTlsContext(opts: StoreTlsServerOptions): tls.SecureContext {
  const cert = readPem(opts.certFile, 'store TLS certificate');
  const key = readPem(opts.keyFile, 'store TLS key');
  try {
    return tls.createSecureContext({ cert, key, minVersion: 'TLSv1.2' });
  } catch (err) {
    throw new StoreError('HYDRA_STORE_TLS_CONFIG', `store TLS certificate ${opts.certFile} with key ${opts.keyFile} unusable: ${(err as Error).message}`, { cause: err });
  }
}

/** Client TLS settings from the environment, or null for plain TCP. */
export function clientTlsFromEnv(env: NodeJS.ProcessEnv = process.env): StoreTlsClientOptions | null {
  const ca = env[TLS_CA_ENV];
  if (!ca) return null;
  const servername = env[TLS_SERVERNAME_ENV];
  return { ca, ...(servername ? { servername } : {}) };
}

/** The CA certificates of a file or directory. */
export function loadCa(where: string): Buffer[] {
  let st: fs.Stats;
  try {
    st = fs.statSync(where);
  } catch (err) {
    throw new StoreError('HYDRA_STORE_TLS_CONFIG', `store TLS CA ${where} (${TLS_CA_ENV} or --store-tls-ca): ${(err as Error).message}`, { cause: err });
  }
  if (!st.isDirectory()) return [readPem(where, 'store TLS CA')];
  const files = fs.readdirSync(where).filter((f) => /\.(pem|crt)$/.test(f)).sort();
  if (files.length === 0) throw new StoreError('HYDRA_STORE_TLS_CONFIG', `store TLS CA directory ${where} holds no .pem or .crt file`);
  return files.map((f) => readPem(path.join(where, f), 'store TLS CA'));
}

function readPem(file: string, what: string): Buffer {
  let b: Buffer;
  try {
    b = fs.readFileSync(file);
  } catch (err) {
    throw new StoreError('HYDRA_STORE_TLS_CONFIG', `${what} ${file}: ${(err as Error).message}`, { cause: err });
  }
  if (!b.includes('-----BEGIN ')) throw new StoreError('HYDRA_STORE_TLS_CONFIG', `${what} ${file} is not a PEM file`);
  return b;
}

/** Explain a failed TLS handshake with the store in terms of the set-up to fix. */
export function tlsFailure(address: string, ca: string, err: NodeJS.ErrnoException): StoreError {
  const code = err.code ?? '';
  let hint: string;
  if (/ALTNAME|HOSTNAME|IP: .* is not in the cert/i.test(code + err.message)) {
    hint = 'the store certificate does not name this address (add it to the certificate\'s subjectAltName, or set ' + TLS_SERVERNAME_ENV + ')';
  } else if (/CERT|SIGNATURE|ISSUER|SELF_SIGNED|VERIFY/.test(code)) {
    hint = `the store certificate is not signed by the CA in ${ca}`;
  } else if (/WRONG_VERSION_NUMBER|ECONNRESET|socket disconnected/i.test(code + err.message)) {
    hint = 'the store does not speak TLS (started without --tls-cert?)';
  } else {
    hint = 'TLS handshake failed';
  }
  return new StoreError('HYDRA_STORE_TLS_FAILED', `TLS connection to store ${address} refused: ${hint}: ${err.message}${code ? ` (${code})` : ''}`, { cause: err });
}
