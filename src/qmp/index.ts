export { QmpClient, connectWhenReady } from './client.js';
export type { QmpEvent, QmpGreeting, QmpConnectOptions } from './client.js';
