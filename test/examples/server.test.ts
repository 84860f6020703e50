// The example inference server (examples/server) over loopback: a scripted multi-turn session,
// forks sharing a prefix, the per-session budget, and 4xx answers for bad requests. Every request
// is bounded by a timeout; the server listens on 127.0.0.1 on an ephemeral port.
import { existsSync, readFileSync } from 'node:fs';
import type { Server } from 'node:http';
import type { AddressInfo } from 'node:net';
import { join, resolve } from 'node:path';

import { afterAll, beforeAll, describe, expect, it } from 'vitest';

import { readCheckpoint } from '../../lib/models/llama2c/checkpoint.js';
import { generate } from '../../lib/models/llama2c/generate.js';
import { Llama2 } from '../../lib/models/llama2c/model.js';
import { Sampler } from '../../lib/models/llama2c/sampler.js';
import { Tokenizer } from '../../lib/models/llama2c/tokenizer.js';
import { createInferenceServer } from '../../examples/server/server.js';

const realkv = resolve(__dirname, '../../../shared/realkv');
const modelPath = join(realkv, 'stories260K.bin');
const tokenizerPath = join(realkv, 'tok512.bin');
const present = existsSync(modelPath) && existsSync(tokenizerPath);
if (!present) console.warn(`server tests skipped: ${modelPath} and ${tokenizerPath} not found (they live in the shared/ folder beside the repo)`);

const REQUEST_TIMEOUT_MS = 10_000;
/** Bytes of keys and values per token in an f16 store: 5 layers x 4 kv heads x 8 x (k + v) x 2 bytes. */
const F16_BYTES_PER_TOKEN = 5 * 4 * 8 * 2 * 2;

interface ServerEvent {
  event: string;
  data: Record<string, unknown>;
}

function parseEvents(text: string): ServerEvent[] {
  return text.split('\n\n').filter((block) => block.trim() !== '').map((block) => {
    const event = /^event: (.*)$/m.exec(block)?.[1] ?? '';
    const data = JSON.parse(/^data: (.*)$/m.exec(block)?.[1] ?? 'null') as Record<string, unknown>;
    return { event, data };
  });
}

describe.skipIf(!present)('example server', () => {
  let server: Server;
  let base = '';
  let model: Llama2;
  let tokenizer: Tokenizer;

  beforeAll(async () => {
    model = new Llama2(readCheckpoint(readFileSync(modelPath)));
    tokenizer = Tokenizer.read(tokenizerPath, model.config.vocabSize);
    server = createInferenceServer({ model, tokenizer, sessionBudgetBytes: 1 << 20, maxSessions: 16, maxBodyBytes: 4096 });
    await new Promise<void>((done) => server.listen(0, '127.0.0.1', done));
    base = `http://127.0.0.1:${(server.address() as AddressInfo).port}`;
  });

  afterAll(async () => {
    server?.closeAllConnections();
    await new Promise((done) => server?.close(done));
  });

  async function post(body: unknown, path = '/generate', at = base) {
    const response = await fetch(`${at}${path}`, {
      method: 'POST', body: typeof body === 'string' ? body : JSON.stringify(body),
      headers: { 'Content-Type': 'application/json' }, signal: AbortSignal.timeout(REQUEST_TIMEOUT_MS),
    });
    const text = await response.text();
    const isStream = response.headers.get('content-type') === 'text/event-stream';
    return { status: response.status, events: isStream ? parseEvents(text) : [], json: isStream ? null : JSON.parse(text) };
  }

  async function stats(at = base) {
    const response = await fetch(`${at}/stats`, { signal: AbortSignal.timeout(REQUEST_TIMEOUT_MS) });
    expect(response.status).toBe(200);
    return (await response.json()) as {
      sessions: Array<{ id: string; parent: string | null; tokens: number; turns: number; busy: boolean;
        stats: { tokens: { seen: number }; bytes: { kv: number; shared: number } } }>;
      parked: Array<{ id: string; bytes: number }>;
      hostMemory: { pagesMapped: number; pagesIdle: number; scratch: number };
    };
  }

  /** Token ids a fresh f16 cache generates greedily after `sequence` (what the server should stream). */
  function greedyAfter(sequence: number[], maxTokens: number): number[] {
    const cache = model.createCache({ policy: { store: { kind: 'f16' } } });
    try {
      return [...generate(model, cache, sequence, { maxTokens, sampler: new Sampler() })];
    } finally {
      cache.dispose();
    }
  }

  const tokenIds = (events: ServerEvent[]) => events.filter((e) => e.event === 'token').map((e) => e.data.id as number);
  const done = (events: ServerEvent[]) => events.find((e) => e.event === 'done')?.data ?? {};

  it('answers a scripted multi-turn session, keeping its cache between turns', async () => {
    const first = await post({ session: 'chat', prompt: 'Once upon a time', maxTokens: 16 });
    expect(first.status).toBe(200);
    expect(first.events.map((e) => e.event)).toEqual(['start', ...new Array(16).fill('token'), 'done']);
    const prompt1 = tokenizer.encode('Once upon a time');
    const turn1 = tokenIds(first.events);
    expect(turn1).toEqual(greedyAfter(prompt1, 16));
    expect(done(first.events)).toMatchObject({ finishReason: 'length', generatedTokens: 16, text: ', there was a little girl named Lily. She loved to play' });

    // Turn 2 continues the same sequence: the server feeds only the last token and the new text.
    const second = await post({ session: 'chat', prompt: ' One day', maxTokens: 12 });
    expect(second.events[0]).toMatchObject({ event: 'start', data: { session: 'chat', position: prompt1.length + 15 } });
    const prompt2 = tokenizer.encode(' One day', { bos: false, prefixSpace: false });
    const turn2 = tokenIds(second.events);
    expect(turn2).toEqual(greedyAfter([...prompt1, ...turn1, ...prompt2], 12));

    const after = await stats();
    const session = after.sessions.find((s) => s.id === 'chat');
    // The session's pages come from kvslim's page pool.
    expect(after.hostMemory.pagesMapped - after.hostMemory.pagesIdle).toBeGreaterThan(0);
    const expectedTokens = prompt1.length + turn1.length + prompt2.length + turn2.length - 1; // the last sampled token is pending
    expect(session).toMatchObject({ turns: 2, busy: false, tokens: expectedTokens });
    expect(session?.stats.tokens.seen).toBe(expectedTokens);
    expect(session?.stats.bytes.kv).toBe(expectedTokens * F16_BYTES_PER_TOKEN);
  });

  it('forks a shared prefix copy-on-write: each branch continues it, the prefix stays', async () => {
    const prefix = 'Once upon a time, there was a little girl named Lily. She loved to play outside in the park. ' +
      'One day, she saw a big, red ball. She wanted to play with it, but it was too high. Her mom said';
    const seeded = await post({ session: 'base', prompt: prefix, maxTokens: 0 });
    expect(done(seeded.events)).toMatchObject({ generatedTokens: 0, pendingTokens: 0 });
    const prefixTokens = tokenizer.encode(prefix);
    expect(prefixTokens.length).toBeGreaterThan(64); // at least one full, shareable page

    const branches = await Promise.all(
      ['Lily', 'Tim'].map((name, i) => post({ session: `branch${i}`, fork: 'base', prompt: ` ${name}`, maxTokens: 6 })),
    );
    branches.forEach((branch, i) => {
      expect(branch.status).toBe(200);
      expect(branch.events[0].data).toMatchObject({ parent: 'base', position: prefixTokens.length });
      const turn = tokenizer.encode(` ${['Lily', 'Tim'][i]}`, { bos: false, prefixSpace: false });
      expect(tokenIds(branch.events)).toEqual(greedyAfter([...prefixTokens, ...turn], 6));
    });
    const sessions = (await stats()).sessions;
    expect(sessions.find((s) => s.id === 'base')?.tokens).toBe(prefixTokens.length);
    for (const id of ['branch0', 'branch1']) {
      const branch = sessions.find((s) => s.id === id);
      expect(branch?.parent).toBe('base');
      expect(branch?.stats.bytes.shared).toBeGreaterThan(0);
    }
  });

  it('keeps a session within its memory budget', async () => {
    const budgetTokens = 20;
    const response = await post({ session: 'tiny', prompt: 'Once upon a time', maxTokens: 100, budgetBytes: budgetTokens * F16_BYTES_PER_TOKEN });
    // The prompt's 5 tokens and 15 fed samples fill the budget; the 16th sample stays pending.
    expect(done(response.events)).toMatchObject({ finishReason: 'budget', generatedTokens: 15, cacheTokens: 19, pendingTokens: 1 });
    expect((done(response.events).bytes as { kv: number }).kv).toBeLessThanOrEqual(budgetTokens * F16_BYTES_PER_TOKEN);
    const over = await post({ session: 'tiny', prompt: ' and then they all went home', maxTokens: 1 });
    expect(over.status).toBe(413);
    expect(over.json.error.code).toBe('ERR_BUDGET');
  });

  it('refuses a second request on a session while it generates, and survives a client that leaves', async () => {
    const controller = new AbortController();
    const timer = setTimeout(() => controller.abort(), REQUEST_TIMEOUT_MS);
    const response = await fetch(`${base}/generate`, {
      method: 'POST', body: JSON.stringify({ session: 'long', prompt: 'Once', maxTokens: 400 }), signal: controller.signal,
    });
    const reader = response.body!.getReader();
    let seen = '';
    while (!seen.includes('event: token')) seen += new TextDecoder().decode((await reader.read()).value);

    const busy = await post({ session: 'long', prompt: ' again', maxTokens: 1 });
    expect(busy.status).toBe(409);
    controller.abort();
    clearTimeout(timer);

    // The server notices the disconnect between tokens and frees the session for the next turn.
    let session;
    for (let attempt = 0; attempt < 100; attempt++) {
      session = (await stats()).sessions.find((s) => s.id === 'long');
      if (!session?.busy) break;
      await new Promise((wait) => setTimeout(wait, 20));
    }
    expect(session?.busy).toBe(false);
    expect(session!.tokens).toBeLessThan(400);
    const next = await post({ session: 'long', prompt: ' The end.', maxTokens: 2 });
    expect(done(next.events)).toMatchObject({ generatedTokens: 2 });
  });

  it.each([
    ['invalid JSON', 400, 'ERR_BAD_REQUEST', '{"prompt": '],
    ['a JSON array', 400, 'ERR_BAD_REQUEST', '[1, 2]'],
    ['no prompt', 400, 'ERR_BAD_REQUEST', { maxTokens: 3 }],
    ['a numeric prompt', 400, 'ERR_BAD_REQUEST', { prompt: 7 }],
    ['negative maxTokens', 400, 'ERR_BAD_REQUEST', { prompt: 'x', maxTokens: -1 }],
    ['fractional maxTokens', 400, 'ERR_BAD_REQUEST', { prompt: 'x', maxTokens: 1.5 }],
    ['maxTokens as a string', 400, 'ERR_BAD_REQUEST', { prompt: 'x', maxTokens: '3' }],
    ['maxTokens past the context', 400, 'ERR_BAD_REQUEST', { prompt: 'x', maxTokens: 100000 }],
    ['a negative temperature', 400, 'ERR_BAD_REQUEST', { prompt: 'x', temperature: -1 }],
    ['an unknown field', 400, 'ERR_BAD_REQUEST', { prompt: 'x', max_tokens: 3 }],
    ['a bad session id', 400, 'ERR_BAD_REQUEST', { prompt: 'x', session: 'has spaces' }],
    ['a policy that is not an object', 400, 'ERR_BAD_REQUEST', { prompt: 'x', policy: 'f16' }],
    ['an unavailable policy', 400, 'ERR_OPTION', { prompt: 'x', policy: { store: { kind: 'kivi', bits: 2 } } }],
    ['a budget above the server\'s', 400, 'ERR_BAD_REQUEST', { prompt: 'x', budgetBytes: 1 << 30 }],
    ['a prompt past the budget', 413, 'ERR_BUDGET', { prompt: 'Once upon a time', budgetBytes: 3 * F16_BYTES_PER_TOKEN }],
    ['a body past the limit', 413, 'ERR_TOO_LARGE', { prompt: 'x'.repeat(5000) }],
    ['a fork of no session', 404, 'ERR_NOT_FOUND', { prompt: 'x', fork: 'nobody' }],
  ])('answers %s with %i %s', async (_name, status, code, body) => {
    const response = await post(body);
    expect(response.status).toBe(status);
    expect(response.json).toMatchObject({ error: { code } });
    expect(typeof response.json.error.message).toBe('string');
  });

  it('answers conflicts, unknown routes and wrong methods with 4xx', async () => {
    await post({ session: 'settled', prompt: 'Once', maxTokens: 0, policy: { store: { kind: 'bf16' } } });
    expect((await post({ session: 'settled', prompt: ' x', policy: { store: { kind: 'f32' } } })).status).toBe(409);
    expect((await post({ session: 'settled', fork: 'chat', prompt: ' x' })).status).toBe(409);
    expect((await post({ session: 'settled', prompt: '' })).status).toBe(400); // nothing new to continue from
    expect((await post({ prompt: 'x' }, '/nowhere')).status).toBe(404);
    const get = await fetch(`${base}/generate`, { signal: AbortSignal.timeout(REQUEST_TIMEOUT_MS) });
    expect(get.status).toBe(405);
    expect(((await get.json()) as { error: { code: string } }).error.code).toBe('ERR_METHOD');
    const remove = (id: string) => fetch(`${base}/sessions/${id}`, { method: 'DELETE', signal: AbortSignal.timeout(REQUEST_TIMEOUT_MS) });
    expect((await remove('settled')).status).toBe(204);
    expect((await remove('settled')).status).toBe(404);
    expect((await stats()).sessions.some((s) => s.id === 'settled')).toBe(false);
  });

  it('starts a session of its own when the request names none', async () => {
    const response = await post({ prompt: 'Once upon a time', maxTokens: 3 });
    const id = response.events[0].data.session as string;
    expect(id).toMatch(/^[0-9a-f-]{36}$/);
    expect((await stats()).sessions.find((s) => s.id === id)?.turns).toBe(1);
  });

  it('parks the least recently used idle session beyond maxSessions (saveAsync) and resumes it exactly (loadAsync)', async () => {
    for (const parkBytes of [1 << 20, 0]) {
      const small = createInferenceServer({ model, tokenizer, sessionBudgetBytes: 1 << 20, maxSessions: 2, parkBytes });
      await new Promise<void>((listening) => small.listen(0, '127.0.0.1', listening));
      const at = `http://127.0.0.1:${(small.address() as AddressInfo).port}`;
      try {
        const prompt1 = tokenizer.encode('Once upon a time');
        const first = await post({ session: 'a', prompt: 'Once upon a time', maxTokens: 10 }, '/generate', at);
        await post({ session: 'b', prompt: 'The cat', maxTokens: 4 }, '/generate', at);
        await post({ session: 'c', prompt: 'A dog', maxTokens: 4 }, '/generate', at);  // 'a' leaves the live sessions
        const afterThird = await stats(at);
        expect(afterThird.sessions.map((s) => s.id)).toEqual(['b', 'c']);
        expect(afterThird.parked.map((p) => p.id)).toEqual(parkBytes > 0 ? ['a'] : []);
        const second = await post({ session: 'a', prompt: ' One day', maxTokens: 8 }, '/generate', at);
        if (parkBytes === 0) {
          // Dropped: the id starts a new session.
          expect(second.events[0]).toMatchObject({ event: 'start', data: { session: 'a', position: 0 } });
          continue;
        }
        // Resumed: the turn continues the saved sequence, token for token as if it had stayed live.
        const turn1 = tokenIds(first.events);
        expect(second.events[0]).toMatchObject({ event: 'start', data: { session: 'a', position: prompt1.length + turn1.length - 1 } });
        const prompt2 = tokenizer.encode(' One day', { bos: false, prefixSpace: false });
        expect(tokenIds(second.events)).toEqual(greedyAfter([...prompt1, ...turn1, ...prompt2], 8));
        const afterResume = await stats(at);
        expect(afterResume.sessions.map((s) => s.id)).toEqual(['c', 'a']);
        expect(afterResume.sessions.find((s) => s.id === 'a')?.turns).toBe(2);
        expect(afterResume.parked.map((p) => p.id)).toEqual(['b']);
        // DELETE reaches a parked session too.
        const deleted = await fetch(`${at}/sessions/b`, { method: 'DELETE', signal: AbortSignal.timeout(REQUEST_TIMEOUT_MS) });
        expect(deleted.status).toBe(204);
        expect((await stats(at)).parked).toEqual([]);
      } finally {
        small.closeAllConnections();
        await new Promise((closed) => small.close(closed));
      }
    }
  });
});
