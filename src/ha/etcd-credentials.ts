// etcd client TLS and authentication for agents, managers and the CLI: flags, environment, and etcd3's options.
import fs from 'node:fs';
import type { IOptions } from 'etcd3';
import { HaError } from '../errors.js';

/**
 * How to reach a secured etcd. Files are PEM. With only `caFile` the
 * connection is TLS with server verification; `certFile` + `keyFile` add a
 * client certificate (etcd's --client-cert-auth). `user` + `password`
 * authenticate to etcd's RBAC (etcd's auth enable); they travel in the
 * clear without TLS, so give both on real networks.
 */
export interface EtcdCredentials {
  caFile?: string;
  certFile?: string;
  keyFile?: string;
  user?: string;
  password?: string;
}

/** The environment variables read when a flag is not given. */
export const ETCD_CREDENTIAL_ENV = {
  caFile: 'HYDRAVM_ETCD_CA',
  certFile: 'HYDRAVM_ETCD_CERT',
  keyFile: 'HYDRAVM_ETCD_KEY',
  user: 'HYDRAVM_ETCD_USER',
  password: 'HYDRAVM_ETCD_PASSWORD',
} as const;

/** Flags first (`--etcd-ca` etc., as commander names them), then HYDRAVM_ETCD_*. */
export function credentialsFrom(flags: { etcdCa?: string; etcdCert?: string; etcdKey?: string; etcdUser?: string; etcdPassword?: string }, env = process.env): EtcdCredentials | undefined {
  const c: EtcdCredentials = {
    caFile: flags.etcdCa ?? env[ETCD_CREDENTIAL_ENV.caFile],
    certFile: flags.etcdCert ?? env[ETCD_CREDENTIAL_ENV.certFile],
    keyFile: flags.etcdKey ?? env[ETCD_CREDENTIAL_ENV.keyFile],
    user: flags.etcdUser ?? env[ETCD_CREDENTIAL_ENV.user],
    password: flags.etcdPassword ?? env[ETCD_CREDENTIAL_ENV.password],
  };
  const given = Object.fromEntries(Object.entries(c).filter(([, v]) => v !== undefined && v !== '')) as EtcdCredentials;
  return Object.keys(given).length ? given : undefined;
}

function readPem(file: string, what: string): Buffer {
  try {
    return fs.readFileSync(file);
  } catch (err) {
    throw new HaError('HYDRA_ETCD_CREDENTIALS', `cannot read the etcd ${what} ${file}: ${(err as Error).message}`, { cause: err });
  }
}

/** etcd3's `credentials` and `auth` options for these credentials. */
export function etcdSecurityOptions(c: EtcdCredentials | undefined): Pick<IOptions, 'credentials' | 'auth'> {
  if (!c) return {};
  const out: Pick<IOptions, 'credentials' | 'auth'> = {};
  if ((c.user === undefined) !== (c.password === undefined)) {
    throw new HaError('HYDRA_ETCD_CREDENTIALS', `etcd authentication needs both a user and a password (got only the ${c.user !== undefined ? 'user' : 'password'})`);
  }
  if ((c.certFile === undefined) !== (c.keyFile === undefined)) {
    throw new HaError('HYDRA_ETCD_CREDENTIALS', `an etcd client certificate needs both --etcd-cert and --etcd-key (got only ${c.certFile !== undefined ? '--etcd-cert' : '--etcd-key'})`);
  }
  if (c.user !== undefined && c.password !== undefined) out.auth = { username: c.user, password: c.password };
  if (c.caFile || c.certFile) {
    out.credentials = {
      rootCertificate: c.caFile ? readPem(c.caFile, 'CA certificate') : (undefined as unknown as Buffer),
      ...(c.certFile ? { certChain: readPem(c.certFile, 'client certificate'), privateKey: readPem(c.keyFile!, 'client key') } : {}),
    };
  }
  return out;
}
