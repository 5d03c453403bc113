import { pino, type Logger } from 'pino';

/**
 * One logger for the whole process. Daemons (VM supervisor, checkpointer,
 * store, agent) log JSON lines to their log file; commands log to stderr.
 * Every log line about a VM carries `vm` so `grep '"vm":"web1"'` finds its story.
 */
export const log: Logger = pino({
  level: process.env.HYDRAVM_LOG_LEVEL ?? 'info',
  base: { pid: process.pid },
}, pino.destination({ fd: 2, sync: true }));

export function vmLog(vm: string): Logger {
  return log.child({ vm });
}
