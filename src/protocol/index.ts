/** The HydraVM store wire protocol: frames, messages, authentication and the client. */
export * from './frames.js';
export * from './messages.js';
export { authResponse, verifyAuth, makeNonce } from './auth.js';
export { StoreClient, type StoreClientOptions, type CommitResult } from './client.js';
