// The benchmarks behind `hydravm bench` (the front door of src/bench).
export { runCheckpointBench, type CheckpointBenchOptions } from './checkpoint-bench.js';
export { runFailoverBench, type FailoverBenchOptions } from './failover-bench.js';
export { runProtocolBench, type ProtocolBenchOptions } from './protocol-bench.js';
