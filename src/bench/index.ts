// The benchmarks behind `hydravm bench` (the front door of src/bench).
export { runCheckpointBench, type CheckpointBenchOptions } from './checkpoint-bench.js';
export { checkpointMarkdown, writeCheckpointDoc, type CheckpointBenchJson } from './checkpoint-report.js';
export { runFailoverBench, type FailoverBenchOptions } from './failover-bench.js';
export { runDebianFailoverBench, type DebianFailoverBenchOptions } from './debian-failover-bench.js';
export { DebianNetnsRig, type FailoverObservation, type FailureKind } from './debian-netns.js';
export { runProtocolBench, type ProtocolBenchOptions } from './protocol-bench.js';
export { RedisWatcher, summarizeWatch, lossReport, lastAcked, readWatchLog, type WatcherOptions, type WatchRecord, type WatchSummary, type LossReport } from './redis-watcher.js';
export { RespConnection, redisOnce, type RespValue } from './resp.js';
export { runEval, readEvalDocument, renderPage, renderReport, parseOnly, mergeEvalDocuments } from './eval/index.js';
export { writeResults } from './harness.js';
