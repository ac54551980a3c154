'use strict';
// Starts a two-step run on the engine at KEEL_ENGINE (default 127.0.0.1:7070), prints its events as
// they happen, then awaits it and prints the final snapshot.   KEEL_ENGINE=127.0.0.1:7070 node example.js

const { KeelClient } = require('./keel');

async function main() {
  const keel = new KeelClient(process.env.KEEL_ENGINE);
  try {
    const started = await keel.startRun({
      pipeline: {
        pipeline_id: 'hello-from-node',
        steps: [
          { step_id: 'greet', op_id: 'keel.echo', op_config: { greeting: 'hello' } },
          { step_id: 'shout', op_id: 'keel.echo', op_config: { loud: true }, depends_on: ['greet'] },
        ],
      },
      input: { name: 'Ada' },
      context: { client: 'node' },
    });
    console.log(`started run ${started.runId}`);
    for await (const event of keel.watchRun(started.runId)) {
      console.log(`  ${String(event.seq).padStart(3)} ${event.type}`);
    }
    const { run } = await keel.awaitRun(started.runId);
    console.log(`run ${run.runId} ${run.status}`);
    console.log(JSON.stringify(run.finalSnapshot, null, 2));
    process.exitCode = run.status === 'completed' ? 0 : 1;
  } finally {
    keel.close();
  }
}

main().catch((error) => {
  console.error(`example failed: ${error.code ? `${error.code}: ` : ''}${error.message}`);
  process.exitCode = 1;
});
