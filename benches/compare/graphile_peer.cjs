// The Graphile Worker side of benches/compare/run.sh: N no-op jobs with C clients, each adding
// one job and waiting until it has run before adding the next (the closed loop `capstan bench`
// drives with --concurrency C). The worker runs in this process with concurrency C and its
// defaults (LISTEN/NOTIFY wake-ups); the no-op task resolves the client's promise. With
// --batched it also uses the batching options Graphile Worker's performance page runs with: a
// local queue of C + 1 jobs fetched at once (the size its release notes recommend) and job
// completions and failures flushed in batches (`completeJobBatchDelay` and `failJobBatchDelay`
// 0). Prints one JSON line. graphile-worker is resolved through NODE_PATH (run.sh installs it
// in its cache).
//
//   NODE_PATH=.../node_modules node graphile_peer.cjs --dsn postgres://... --jobs 2000 --concurrency 64 [--batched]
"use strict";

const fs = require("fs");
const path = require("path");
const { run } = require("graphile-worker");
// The installed version, read from the package's own package.json: 0.18 no longer exports it.
const version = (() => {
  for (let dir = path.dirname(require.resolve("graphile-worker")); dir !== path.dirname(dir); dir = path.dirname(dir)) {
    const file = path.join(dir, "package.json");
    if (fs.existsSync(file)) {
      const pkg = JSON.parse(fs.readFileSync(file, "utf8"));
      if (pkg.name === "graphile-worker") return pkg.version;
    }
  }
  return "?";
})();

function arg(name, fallback) {
  const i = process.argv.indexOf(`--${name}`);
  return i > 0 ? process.argv[i + 1] : fallback;
}

// CPU seconds of every process named postgres* (the server's backends), from /proc.
function postgresCpuS() {
  let total = 0;
  for (const pid of fs.readdirSync("/proc")) {
    if (!/^\d+$/.test(pid)) continue;
    let stat;
    try {
      stat = fs.readFileSync(`/proc/${pid}/stat`, "utf8");
    } catch {
      continue;
    }
    const name = stat.slice(stat.indexOf("(") + 1, stat.lastIndexOf(")"));
    if (name.startsWith("postgres")) {
      const fields = stat.slice(stat.lastIndexOf(")") + 2).split(" ");
      total += (Number(fields[11]) + Number(fields[12])) / 100;
    }
  }
  return total;
}

function percentile(samples, q) {
  const s = [...samples].sort((a, b) => a - b);
  const rank = Math.max(1, Math.min(s.length, Math.ceil(q * s.length)));
  return s[rank - 1];
}

async function main() {
  const dsn = arg("dsn");
  const jobs = Number(arg("jobs", "2000"));
  const concurrency = Number(arg("concurrency", "64"));
  const batched = process.argv.includes("--batched");
  const waiting = new Map();
  const preset = batched
    ? { worker: { localQueue: { size: concurrency + 1 }, completeJobBatchDelay: 0, failJobBatchDelay: 0 } }
    : undefined;
  const runner = await run({
    connectionString: dsn,
    concurrency,
    preset,
    noHandleSignals: true,
    logger: new (require("graphile-worker").Logger)(() => () => {}),
    taskList: {
      noop: async (payload) => {
        const done = waiting.get(payload.i);
        if (done) done();
      },
    },
  });
  let next = 0;
  const latencies = [];
  async function client() {
    for (;;) {
      const i = next++;
      if (i >= jobs) return;
      const t0 = process.hrtime.bigint();
      const finished = new Promise((resolve) => waiting.set(i, resolve));
      await runner.addJob("noop", { i });
      await finished;
      waiting.delete(i);
      latencies.push(Number(process.hrtime.bigint() - t0) / 1e6);
    }
  }
  const cpu0 = process.cpuUsage();
  const pg0 = postgresCpuS();
  const start = process.hrtime.bigint();
  await Promise.all(Array.from({ length: concurrency }, client));
  const elapsed = Number(process.hrtime.bigint() - start) / 1e9;
  const cpu = process.cpuUsage(cpu0);
  const pg1 = postgresCpuS();
  await runner.stop();
  const round = (x, d) => Math.round(x * 10 ** d) / 10 ** d;
  console.log(
    JSON.stringify({
      peer: "graphile-worker",
      version,
      batched,
      jobs,
      concurrency,
      elapsed_s: round(elapsed, 3),
      jobs_per_s: round(jobs / elapsed, 1),
      p50_ms: round(percentile(latencies, 0.5), 2),
      p99_ms: round(percentile(latencies, 0.99), 2),
      client_cpu_s: round((cpu.user + cpu.system) / 1e6, 2),
      postgres_cpu_s: round(pg1 - pg0, 2),
    }),
  );
}

main().catch((e) => {
  console.error(e);
  process.exit(1);
});
