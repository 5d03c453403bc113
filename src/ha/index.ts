/**
 * HydraVM high availability: failure detection and automatic fail-over, with
 * cluster state in etcd. See docs/ha.md.
 */
export { startEtcd, waitEtcdHealthy, findEtcd, freePort, etcdHealthy, type EtcdProcess, type EtcdOptions } from './etcd-process.js';
export {
  Cluster, connectEtcd, keys, PREFIX, deriveTiming,
  type ClusterOptions, type HostRecord, type KnownHost, type VmRecord, type VmHaState, type Assignment, type FailoverTiming, type ClusterEvent, type RestoreMode, type Versioned, type Heartbeat, type HostDead,
} from './cluster.js';
export { HostAgent, startAgent, type AgentOptions } from './agent.js';
export { etcdSecurityOptions, credentialsFrom, type EtcdCredentials } from './etcd-credentials.js';
export { parseAssignment } from './assignment-schema.js';
export { FailoverManager, startManager, assignRestore, DEFAULT_FENCE_MARGIN_MS, type ManagerOptions } from './manager.js';
export { placeVm, reservations, type PlacementRequest, type PlacementResult } from './placement.js';
export { readLocalVm, listLocalVms, vmDeath, writeHaLocal, type HaLocal, type LocalVm } from './local-vm.js';
export { fenceLocalVm, staleReason } from './fence.js';
export { protectInCluster, forgetVm, waitForVm, waitForFailover, clusterStatus, type ClusterStatus, type ProtectInClusterRequest } from './client.js';
export { startEmbeddedCluster, stopEmbeddedCluster, restartDaemon, readClusterInfo, defaultClusterDir, type EmbeddedCluster, type EmbeddedClusterInfo, type EmbeddedClusterOptions } from './embedded.js';
export { startNetnsCluster, DEFAULT_NETNS_PREFIX, type NetnsClusterOptions } from './netns-cluster.js';
export { killNetnsHost, reviveNetnsHost } from './netns-host.js';
export { planNetns, removeNetns, setHostLink, existingWithPrefix, processInNetns, inNetns, type NetnsLayout, type NetnsHost } from './netns.js';
export type { RestoreFn, RestoreRequest, RestoreOutcome, ProtectFn } from './restore-adapter.js';
export { HaError } from '../errors.js';
export { ClusterStore, DEFAULT_STORE_LEASE_TTL_SEC, type ClusterStoreOptions } from './store-daemon.js';
export { CLUSTER_STORE, isClusterStore, listStores, resolveStore, storeAddress, storeResolver, type StoreRecord, type StoreList } from './store-discovery.js';
