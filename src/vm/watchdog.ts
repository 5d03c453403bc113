// The per-VM watchdog file: the host agent feeds it with each proof of its lease; the supervisor kills QEMU when it starves.
import fs from 'node:fs';

/**
 * HOME/vms/NAME/watchdog.json, written (atomically) by the host agent each
 * time etcd acknowledged its lease keepalive, for every VM the cluster could
 * restore elsewhere once that lease is gone. Its presence arms the VM's
 * supervisor; its absence disarms it (the VM is not under HA).
 *
 * Times are CLOCK_MONOTONIC milliseconds (`monoNow()`), which every process
 * of one host shares and which no clock adjustment moves, so the agent can
 * hand the supervisor a deadline instead of a wall-clock time.
 */
export interface WatchdogFeed {
  vm: string;
  host: string;
  /** The generation this copy runs at (informational). */
  generation: number;
  /** Monotonic time the newest acknowledged keepalive was sent (etcd's expiry is at least this + TTL). */
  proofMono: number;
  /** The lease TTL etcd granted, ms. */
  ttlMs: number;
  /** Kill QEMU once monoNow() passes this: proofMono + ttlMs - the agent's margin. */
  deadlineMono: number;
  /** Set when the agent wants this copy dead now (its generation is stale): the reason. */
  revoked?: string;
  agentPid: number;
  /** Wall clock of the write, for people reading the file. */
  writtenAt: string;
}

/** CLOCK_MONOTONIC in ms (process.hrtime is CLOCK_MONOTONIC, shared by every process of the host). */
export function monoNow(): number {
  return Number(process.hrtime.bigint() / 1000n) / 1000;
}

export function readWatchdogFeed(file: string): WatchdogFeed | undefined {
  let text: string;
  try {
    text = fs.readFileSync(file, 'utf8');
  } catch {
    return undefined;
  }
  try {
    const f = JSON.parse(text) as WatchdogFeed;
    return typeof f.deadlineMono === 'number' ? f : { ...f, deadlineMono: 0, revoked: f.revoked ?? 'unreadable watchdog feed' };
  } catch {
    // A torn or foreign file is no proof: starve (renames make torn files impossible from the agent).
    return { vm: '', host: '', generation: 0, proofMono: 0, ttlMs: 0, deadlineMono: 0, revoked: `unreadable watchdog feed ${file}`, agentPid: 0, writtenAt: '' };
  }
}

/**
 * Rename-atomic, deliberately without fsync: it is rewritten several times a
 * second, and a feed lost in a crash only errs on the safe side (starvation).
 */
export function writeWatchdogFeed(file: string, feed: WatchdogFeed): void {
  const tmp = `${file}.tmp-${process.pid}`;
  fs.writeFileSync(tmp, JSON.stringify(feed) + '\n', { mode: 0o600 });
  fs.renameSync(tmp, file);
}

/** Why this feed no longer proves the lease at `now`, or undefined while it does. */
export function starvedReason(feed: WatchdogFeed | undefined, now = monoNow()): string | undefined {
  if (!feed) return undefined;
  if (feed.revoked) return `revoked by the host agent: ${feed.revoked}`;
  if (now > feed.deadlineMono) {
    const since = Math.round(now - feed.proofMono);
    return `no proof of host ${feed.host}'s lease for ${since} ms (TTL ${feed.ttlMs} ms, deadline passed by ${Math.round(now - feed.deadlineMono)} ms): agent dead, etcd unreachable or the host partitioned`;
  }
  return undefined;
}

export interface WatchdogGuard {
  stop(): void;
}

/**
 * Poll the feed every `pollMs` and call `expire` once, with the reason, when
 * it starves. A supervisor polls at 50 ms: the fencing arithmetic in
 * docs/ha.md counts this period.
 */
export function guardWithWatchdog(file: string, expire: (reason: string) => void, pollMs = 50): WatchdogGuard {
  let done = false;
  const check = () => {
    if (done) return;
    const reason = starvedReason(readWatchdogFeed(file));
    if (reason) {
      done = true;
      clearInterval(timer);
      expire(reason);
    }
  };
  const timer = setInterval(check, pollMs);
  check();
  return {
    stop() {
      done = true;
      clearInterval(timer);
    },
  };
}
