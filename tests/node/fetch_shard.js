#!/usr/bin/env node
// Fetch one tensor from a weightserve server with stock @grpc/grpc-js and verify it.
//
//   node tests/node/fetch_shard.js HOST:PORT MODEL TENSOR
//
// Calls GetManifest, then FetchShard for that tensor alone (`names`), places each
// chunk's bytes at its offset, checks every chunk's crc32c and the last chunk's
// tensor_crc32c (and the manifest's digest when it has one), and prints one JSON line:
// {name, dtype, shape, nbytes, crc32c, sha256, chunks}. Any mismatch exits 1 with a
// message on stderr. Nothing here is weightserve code: it is what a client in another
// language sees of the wire contract (compat/released, the last released .proto, and
// docs/wire.md).
'use strict';

const crypto = require('crypto');
const path = require('path');

const REPO = path.resolve(__dirname, '..', '..');
const TIMEOUT_MS = 30000;

function fail(message) {
  process.stderr.write(`fetch_shard.js: ${message}\n`);
  process.exit(1);
}

function load(name) {
  try {
    return require(require.resolve(name, { paths: [REPO, __dirname] }));
  } catch (e) {
    return fail(`cannot load ${name} (${e.code || e.message}): run \`npm install\` in ${REPO} (make node)`);
  }
}

const grpc = load('@grpc/grpc-js');
const protoLoader = load('@grpc/proto-loader');

// crc32c (Castagnoli), table-driven over the reflected polynomial 0x82F63B78.
const CRC_TABLE = (() => {
  const table = new Uint32Array(256);
  for (let n = 0; n < 256; n++) {
    let c = n;
    for (let k = 0; k < 8; k++) c = c & 1 ? (c >>> 1) ^ 0x82f63b78 : c >>> 1;
    table[n] = c >>> 0;
  }
  return table;
})();

// crc32c of `bytes`, continuing from `crc` (the crc32c of what came before).
function crc32c(bytes, crc = 0) {
  let c = (crc ^ 0xffffffff) >>> 0;
  for (let i = 0; i < bytes.length; i++) c = CRC_TABLE[(c ^ bytes[i]) & 0xff] ^ (c >>> 8);
  return (c ^ 0xffffffff) >>> 0;
}

if (crc32c(Buffer.from('123456789')) !== 0xe3069283) fail('crc32c self-test failed');

function main() {
  const [address, model, tensorName] = process.argv.slice(2);
  if (!tensorName) fail('usage: fetch_shard.js HOST:PORT MODEL TENSOR');
  setTimeout(() => fail(`no answer from ${address} within ${TIMEOUT_MS} ms`), TIMEOUT_MS).unref();

  // The last released contract (compat/released), not today's proto/: this stands for a
  // client built against that release, so the test shows today's server still answers
  // it. `buf breaking` checks the .proto; this checks the bytes on the wire.
  const definition = protoLoader.loadSync('weightserve/v1/weightserve.proto', {
    includeDirs: [path.join(REPO, 'compat', 'released')],
    keepCase: true,
    longs: String,
    enums: String,
    defaults: true,
    oneofs: true,
  });
  const v1 = grpc.loadPackageDefinition(definition).weightserve.v1;
  const client = new v1.WeightService(address, grpc.credentials.createInsecure(), {
    'grpc.max_receive_message_length': 8 * 1024 * 1024,
  });
  const deadline = () => new Date(Date.now() + TIMEOUT_MS);
  const shard = { model, rank: 0, world_size: 1 };

  client.GetManifest({ shard }, { deadline: deadline() }, (err, manifest) => {
    if (err) fail(`GetManifest: ${grpc.status[err.code]}: ${err.details}`);
    const index = manifest.tensors.findIndex((t) => t.name === tensorName);
    if (index < 0) fail(`no tensor ${tensorName} in the manifest of ${model}`);
    fetch(client, deadline(), shard, manifest, index);
  });
}

function fetch(client, deadline, shard, manifest, index) {
  const info = manifest.tensors[index];
  const nbytes = Number(info.nbytes);
  const shape = info.shape.map(Number);
  const bytes = Buffer.alloc(nbytes);
  const spans = [];
  let sawHeader = false;
  let tensorCrc = null;

  const request = {
    shard: { ...shard, revision: manifest.revision },
    names: [info.name],
    manifest_id: manifest.manifest_id,
  };
  const stream = client.FetchShard(request, { deadline });
  stream.on('data', (chunk) => {
    if (chunk.tensor_index !== index) fail(`chunk of tensor ${chunk.tensor_index}, asked for ${index}`);
    if (tensorCrc !== null) fail('chunk after the last chunk');
    if (chunk.header) {
      const h = chunk.header;
      const same =
        h.name === info.name && h.dtype === info.dtype && Number(h.nbytes) === nbytes &&
        JSON.stringify(h.shape.map(Number)) === JSON.stringify(shape);
      if (!same) fail(`header ${JSON.stringify(h)} disagrees with the manifest's ${JSON.stringify(info)}`);
      sawHeader = true;
    }
    const offset = Number(chunk.offset);
    const data = chunk.data;
    if (crc32c(data) !== chunk.crc32c) fail(`chunk at ${offset}: crc32c ${crc32c(data)} != ${chunk.crc32c}`);
    if (offset + data.length > nbytes) fail(`chunk [${offset}, ${offset + data.length}) past ${nbytes} bytes`);
    data.copy(bytes, offset);
    spans.push([offset, data.length]);
    if (chunk.last) tensorCrc = chunk.tensor_crc32c >>> 0;
  });
  stream.on('error', (err) => fail(`FetchShard: ${grpc.status[err.code]}: ${err.details}`));
  stream.on('end', () => {
    if (!sawHeader) fail('no chunk carried the tensor header');
    if (tensorCrc === null) fail('the stream ended without a last chunk');
    spans.sort((a, b) => a[0] - b[0]);
    let covered = 0;
    for (const [offset, length] of spans) {
      if (offset !== covered) fail(`chunks leave a gap or overlap at byte ${covered} (next chunk at ${offset})`);
      covered += length;
    }
    if (covered !== nbytes) fail(`received ${covered} bytes of ${nbytes}`);
    const crc = crc32c(bytes);
    if (crc !== tensorCrc) fail(`whole-tensor crc32c ${crc} != tensor_crc32c ${tensorCrc}`);
    if (info._crc32c === 'crc32c' && info.crc32c >>> 0 !== crc) fail(`crc32c ${crc} != manifest's ${info.crc32c}`);
    const result = {
      name: info.name,
      dtype: info.dtype,
      shape,
      nbytes,
      crc32c: crc,
      sha256: crypto.createHash('sha256').update(bytes).digest('hex'),
      chunks: spans.length,
    };
    process.stdout.write(`${JSON.stringify(result)}\n`);
    process.exit(0);
  });
}

main();
