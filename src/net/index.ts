// Host networking for VMs: NIC models, MACs, tap devices on bridges.
export { NIC_MODELS, normalizeMac, checkIfName, type NicModel, type MacCheck } from './mac.js';
export { assertBridge, createTap, removeTap, tapHolders, linkExists, type TapRequest } from './tap.js';
