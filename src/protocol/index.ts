/** The HydraVM store wire protocol: frames, messages, authentication and the client. */
export * from './frames.js';
export * from './messages.js';
export { deriveSession, makeNonce, proofMatches, transcriptHash, NONCE_SIZE, type SessionKeys } from './auth.js';
export * from './tls.js';
export { StoreClient, type StoreClientOptions, type CommitResult } from './client.js';
