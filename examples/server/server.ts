// An example inference server on kvslim: a llama2.c model, one KVCache per session.
//   POST /generate        {prompt, maxTokens?, policy?, session?, fork?, temperature?, seed?, budgetBytes?}
//                         streams the sampled tokens as server-sent events (start, token..., done)
//   GET  /stats           every session's state and its cache's live stats(), and kvslim's hostMemory()
//   DELETE /sessions/:id  frees a session's cache
// Run: node dist/examples/server/server.js --model stories260K.bin --tokenizer tok512.bin [--port 8080]
import { createServer, type IncomingMessage, type Server, type ServerResponse } from 'node:http';
import { parseArgs } from 'node:util';

import { hostMemory, KVSlimError, type PolicySpec } from '../../lib/index.js';
import { readCheckpoint } from '../../lib/models/llama2c/checkpoint.js';
import { type FinishReason, generate, runsAsScript } from '../../lib/models/llama2c/generate.js';
import { Llama2 } from '../../lib/models/llama2c/model.js';
import { Sampler } from '../../lib/models/llama2c/sampler.js';
import { BOS, EOS, Tokenizer } from '../../lib/models/llama2c/tokenizer.js';
import { RequestError, type Room, type Session, SessionStore } from './sessions.js';

export interface InferenceServerOptions {
  model: Llama2;
  tokenizer: Tokenizer;
  /** Most key/value bytes one session may hold (default 4 MiB); a request may ask for less. */
  sessionBudgetBytes?: number;
  /** Live sessions kept at most (default 64); beyond it the least recently used idle one is parked or dropped. */
  maxSessions?: number;
  /**
   * Bytes of saved caches kept for parked sessions (default 64 MiB; 0: drop instead). A request
   * naming a parked session loads it back and goes on exactly where it stopped.
   */
  parkBytes?: number;
  /** Largest request body accepted (default 64 KiB). */
  maxBodyBytes?: number;
}

/** A generate request after validation. */
interface GenerateRequest {
  prompt: string;
  maxTokens: number;
  policy?: PolicySpec;
  session?: string;
  fork?: string;
  temperature: number;
  seed: number;
  budgetBytes?: number;
}

const DEFAULT_MAX_TOKENS = 64;
const SESSION_ID = /^[A-Za-z0-9_.:-]{1,64}$/;
const requestKeys = ['prompt', 'maxTokens', 'policy', 'session', 'fork', 'temperature', 'seed', 'budgetBytes'];

function badRequest(message: string): RequestError {
  return new RequestError(400, 'ERR_BAD_REQUEST', message);
}

function sendJson(res: ServerResponse, status: number, body: unknown, headers: Record<string, string> = {}): void {
  const text = JSON.stringify(body);
  res.writeHead(status, { 'Content-Type': 'application/json', 'Content-Length': Buffer.byteLength(text), ...headers });
  res.end(text);
}

function sendError(res: ServerResponse, error: unknown): void {
  if (res.headersSent) {
    console.error(error);
    res.end();
    return;
  }
  let status = 500;
  let code = 'ERR_INTERNAL';
  let message = error instanceof Error ? error.message : String(error);
  if (error instanceof RequestError) {
    ({ status, code } = error);
  } else if (error instanceof KVSlimError && ['ERR_OPTION', 'ERR_VALUE', 'ERR_SHAPE', 'ERR_DTYPE'].includes(error.code)) {
    ({ status, code } = { status: 400, code: error.code });
  } else {
    message = 'Internal error';
    console.error(error);
  }
  // A request whose body was not read to the end cannot share its connection with the next one.
  sendJson(res, status, { error: { code, message } }, status === 413 ? { Connection: 'close' } : {});
}

/** The request body as text, refused with 413 past `limit` bytes and 400 when it is not UTF-8. */
async function readBody(req: IncomingMessage, limit: number): Promise<string> {
  const declared = Number(req.headers['content-length'] ?? 0);
  const tooLarge = () => new RequestError(413, 'ERR_TOO_LARGE', `The request body exceeds ${limit} bytes`);
  if (declared > limit) throw tooLarge();
  const chunks: Buffer[] = [];
  let size = 0;
  for await (const chunk of req as AsyncIterable<Buffer>) {
    size += chunk.length;
    if (size > limit) throw tooLarge();
    chunks.push(chunk);
  }
  try {
    return new TextDecoder('utf-8', { fatal: true }).decode(Buffer.concat(chunks));
  } catch {
    throw badRequest('The request body is not valid UTF-8');
  }
}

/** Checks a POST /generate body field by field; every message names the field. */
function parseGenerateRequest(text: string, seqLen: number): GenerateRequest {
  let body: unknown;
  try {
    body = JSON.parse(text);
  } catch (error) {
    throw badRequest(`The request body is not valid JSON (${(error as Error).message})`);
  }
  if (typeof body !== 'object' || body === null || Array.isArray(body)) throw badRequest('Expected a JSON object as the request body');
  const fields = body as Record<string, unknown>;
  for (const key of Object.keys(fields)) {
    if (!requestKeys.includes(key)) throw badRequest(`Unknown field '${key}'; expected ${requestKeys.join(', ')}`);
  }
  const { prompt, maxTokens = DEFAULT_MAX_TOKENS, policy, session, fork, temperature = 0, seed = 0, budgetBytes } = fields;
  if (typeof prompt !== 'string') throw badRequest(`Expected a string for prompt but received ${JSON.stringify(prompt) ?? 'nothing'}`);
  if (!Number.isInteger(maxTokens) || (maxTokens as number) < 0 || (maxTokens as number) > seqLen) {
    throw badRequest(`Expected an integer in [0, ${seqLen}] for maxTokens but received ${JSON.stringify(maxTokens)}`);
  }
  if (typeof temperature !== 'number' || !(temperature >= 0 && temperature <= 100)) {
    throw badRequest(`Expected a number in [0, 100] for temperature but received ${JSON.stringify(temperature)}`);
  }
  if (!Number.isSafeInteger(seed)) throw badRequest(`Expected an integer for seed but received ${JSON.stringify(seed)}`);
  for (const [name, id] of [['session', session], ['fork', fork]] as const) {
    if (id !== undefined && (typeof id !== 'string' || !SESSION_ID.test(id))) {
      throw badRequest(`Expected ${name} to be 1-64 characters of A-Z a-z 0-9 _ . : - but received ${JSON.stringify(id)}`);
    }
  }
  if (policy !== undefined && (typeof policy !== 'object' || policy === null || Array.isArray(policy))) {
    throw badRequest(`Expected an object for policy but received ${JSON.stringify(policy)}`);
  }
  if (budgetBytes !== undefined && !Number.isSafeInteger(budgetBytes)) {
    throw badRequest(`Expected an integer for budgetBytes but received ${JSON.stringify(budgetBytes)}`);
  }
  return {
    prompt, maxTokens: maxTokens as number, temperature, seed: seed as number,
    ...(policy !== undefined && { policy: policy as PolicySpec }),
    ...(session !== undefined && { session: session as string }),
    ...(fork !== undefined && { fork: fork as string }),
    ...(budgetBytes !== undefined && { budgetBytes: budgetBytes as number }),
  };
}

/** Writes one server-sent event; resolves once the socket can take more (or has closed). */
function sendEvent(res: ServerResponse, event: string, data: unknown): Promise<void> {
  const accepted = res.write(`event: ${event}\ndata: ${JSON.stringify(data)}\n\n`);
  if (accepted || res.destroyed) return Promise.resolve();
  return new Promise((resolve) => {
    res.once('drain', resolve);
    res.once('close', resolve);
  });
}

/**
 * An HTTP server (not yet listening) serving generation over `model`. Closing it frees every
 * session's cache.
 */
export function createInferenceServer(options: InferenceServerOptions): Server {
  const { model, tokenizer, sessionBudgetBytes = 4 << 20, maxSessions = 64, maxBodyBytes = 64 << 10, parkBytes = 64 << 20 } = options;
  const sessions = new SessionStore(model, { maxSessions, budgetBytes: sessionBudgetBytes, parkBytes });
  const { seqLen } = model.config;

  /** The session a request runs on: existing, forked or new (new ones are registered only once they can run). */
  async function resolveSession(request: GenerateRequest): Promise<{ session: Session; created: boolean }> {
    const existing = request.session === undefined ? undefined : await sessions.resume(request.session);
    if (existing !== undefined) {
      if (request.fork !== undefined) {
        throw new RequestError(409, 'ERR_CONFLICT', `Session '${existing.id}' already exists; fork creates a new session`);
      }
      if (request.budgetBytes !== undefined) throw new RequestError(409, 'ERR_CONFLICT', 'budgetBytes is set when a session is created');
      if (existing.busy) throw new RequestError(409, 'ERR_CONFLICT', `Session '${existing.id}' is generating; wait for its done event`);
      if (request.policy !== undefined) {
        const asked = model.createCache({ policy: request.policy }); // validates and resolves the spec
        const same = JSON.stringify(asked.policy) === JSON.stringify(existing.cache.policy);
        asked.dispose();
        if (!same) {
          throw new RequestError(409, 'ERR_CONFLICT', `Session '${existing.id}' was created with policy ${JSON.stringify(existing.cache.policy)}`);
        }
      }
      return { session: existing, created: false };
    }
    if (request.fork !== undefined) {
      const source = await sessions.resume(request.fork);
      if (source === undefined) throw new RequestError(404, 'ERR_NOT_FOUND', `No session '${request.fork}' to fork`);
      if (request.policy !== undefined || request.budgetBytes !== undefined) {
        throw new RequestError(409, 'ERR_CONFLICT', 'A fork keeps the policy and budget of its source session');
      }
      return { session: sessions.fork(source, request.session), created: true };
    }
    return { session: sessions.create(request.session, request.policy, request.budgetBytes), created: true };
  }

  async function handleGenerate(req: IncomingMessage, res: ServerResponse): Promise<void> {
    const request = parseGenerateRequest(await readBody(req, maxBodyBytes), seqLen);
    const { session, created } = await resolveSession(request);
    let registered = !created;
    try {
      // A session's first prompt starts a sequence (BOS, dummy-prefix space); later turns are
      // appended verbatim after the token the previous turn ended with.
      const fresh = session.tokens === 0 && session.pending.length === 0;
      const feed = [
        ...session.pending,
        ...tokenizer.encode(request.prompt, { bos: fresh, prefixSpace: fresh }),
      ];
      if (feed.length === 0) throw badRequest(`The prompt is empty and session '${session.id}' has nothing new to continue from`);
      const room = session.room(seqLen);
      if (feed.length > room.tokens) {
        throw new RequestError(
          413, room.limit === 'budget' ? 'ERR_BUDGET' : 'ERR_CONTEXT',
          `The prompt needs ${feed.length} tokens but session '${session.id}' has room for ${Math.max(room.tokens, 0)} ` +
            (room.limit === 'budget'
              ? `(budget ${session.budgetBytes} bytes at ${session.bytesPerToken} bytes per token)`
              : `(context ${seqLen} tokens)`),
        );
      }
      if (created) {
        sessions.add(session);
        registered = true;
      }
      session.busy = true;
      await streamGeneration(res, session, feed, request, room);
    } catch (error) {
      if (created && !registered) session.cache.dispose();
      throw error;
    } finally {
      session.busy = false;
    }
  }

  async function streamGeneration(
    res: ServerResponse, session: Session, feed: number[], request: GenerateRequest, room: Room,
  ): Promise<void> {
    // Every sampled token but the last is fed, so `room - feed` tokens may be sampled.
    const allowed = room.tokens - feed.length;
    const maxTokens = Math.min(request.maxTokens, allowed);
    let closed = false;
    res.once('close', () => {
      closed = !res.writableFinished;
    });
    res.writeHead(200, { 'Content-Type': 'text/event-stream', 'Cache-Control': 'no-cache', 'X-Accel-Buffering': 'no' });
    const position = session.tokens;
    await sendEvent(res, 'start', { session: session.id, parent: session.parent, position, promptTokens: feed.length });

    const decoder = new TextDecoder();
    let text = '';
    let generated = 0;
    let finishReason: FinishReason | 'budget' | 'disconnected' = 'length';
    const sampler = new Sampler({ temperature: request.temperature, seed: request.seed });
    const tokens = generate(model, session.cache, feed, { maxTokens, sampler });
    session.pending = [];
    session.turns++;
    try {
      let previous = feed[feed.length - 1];
      for (let next = tokens.next(); ; next = tokens.next()) {
        if (next.done) {
          finishReason = next.value === 'length' && maxTokens < request.maxTokens ? room.limit : next.value;
          break;
        }
        const token = next.value;
        session.pending = [token];
        generated++;
        const piece = token === BOS || token === EOS ? '' : decoder.decode(tokenizer.decode(token, previous), { stream: true });
        previous = token;
        text += piece;
        await sendEvent(res, 'token', { id: token, text: piece });
        // Let other requests and sockets run between tokens.
        await new Promise((resolve) => setImmediate(resolve));
        if (closed || res.destroyed) {
          finishReason = 'disconnected';
          tokens.return('length');
          break;
        }
      }
    } catch (error) {
      // A forward pass that failed part-way may have left layers uneven: drop the session.
      sessions.delete(session.id);
      const code = error instanceof KVSlimError ? error.code : 'ERR_INTERNAL';
      await sendEvent(res, 'error', { code, message: (error as Error).message });
      res.end();
      return;
    }
    if (finishReason === 'disconnected') return;
    text += decoder.decode();
    const stats = session.cache.stats();
    await sendEvent(res, 'done', {
      session: session.id, finishReason, generatedTokens: generated, text,
      cacheTokens: session.tokens, pendingTokens: session.pending.length,
      bytes: stats.bytes, compressionRatio: stats.compressionRatio,
    });
    res.end();
  }

  const server = createServer((req, res) => {
    const url = new URL(req.url ?? '/', 'http://localhost');
    const route = (async () => {
      if (url.pathname === '/generate') {
        if (req.method !== 'POST') throw new RequestError(405, 'ERR_METHOD', `Use POST for /generate, not ${req.method}`);
        return handleGenerate(req, res);
      }
      if (url.pathname === '/stats') {
        if (req.method !== 'GET') throw new RequestError(405, 'ERR_METHOD', `Use GET for /stats, not ${req.method}`);
        return sendJson(res, 200, {
          model: model.config, budgetBytes: sessions.budgetBytes, maxSessions, parkBytes,
          sessions: sessions.list().map((session) => session.describe()), parked: sessions.parked(), hostMemory: hostMemory(),
        });
      }
      const match = /^\/sessions\/([^/]+)$/.exec(url.pathname);
      if (match) {
        if (req.method !== 'DELETE') throw new RequestError(405, 'ERR_METHOD', `Use DELETE for /sessions/:id, not ${req.method}`);
        let id: string;
        try {
          id = decodeURIComponent(match[1]);
        } catch {
          throw badRequest(`The session id in ${url.pathname} is not valid percent-encoding`);
        }
        if (sessions.get(id)?.busy) throw new RequestError(409, 'ERR_CONFLICT', `Session '${id}' is generating`);
        if (!sessions.delete(id)) throw new RequestError(404, 'ERR_NOT_FOUND', `No session '${id}'`);
        res.writeHead(204).end();
        return;
      }
      throw new RequestError(404, 'ERR_NOT_FOUND', `No route ${req.method} ${url.pathname}; try POST /generate, GET /stats, DELETE /sessions/:id`);
    })();
    route.catch((error: unknown) => sendError(res, error));
  });
  server.requestTimeout = 60_000;
  server.on('close', () => sessions.clear());
  return server;
}

const usage = `Usage: server --model <model.bin> --tokenizer <tokenizer.bin> [options]

An example inference server: POST /generate streams tokens (server-sent events), GET /stats
shows every session's cache, DELETE /sessions/:id frees one.

  --model <path>         llama2.c checkpoint (legacy format)
  --tokenizer <path>     its tokenizer.bin
  --host <address>       default 127.0.0.1
  --port <n>             default 8080 (0: any free port)
  --budget <bytes>       most key/value bytes per session (default 4194304)
  --max-sessions <n>     live sessions kept at most (default 64)
  --park <bytes>         saved caches kept for sessions beyond it (default 67108864; 0: drop them)
  --help                 this text
`;

function main(argv: string[]): void {
  const { values } = parseArgs({
    args: argv,
    options: {
      model: { type: 'string' }, tokenizer: { type: 'string' }, host: { type: 'string', default: '127.0.0.1' },
      port: { type: 'string', default: '8080' }, budget: { type: 'string', default: String(4 << 20) },
      'max-sessions': { type: 'string', default: '64' }, park: { type: 'string', default: String(64 << 20) }, help: { type: 'boolean' },
    },
  });
  if (values.help || values.model === undefined || values.tokenizer === undefined) {
    (values.help ? process.stdout : process.stderr).write(usage);
    process.exitCode = values.help ? 0 : 2;
    return;
  }
  const port = Number(values.port);
  const budget = Number(values.budget);
  const maxSessions = Number(values['max-sessions']);
  const parkBytes = Number(values.park);
  const valid = Number.isInteger(port) && port >= 0 && port <= 65535 && Number.isSafeInteger(budget) && budget >= 1 &&
    Number.isInteger(maxSessions) && maxSessions >= 1 && Number.isSafeInteger(parkBytes) && parkBytes >= 0;
  if (!valid) {
    process.stderr.write(`server: --port must be 0-65535, --budget and --max-sessions positive integers, --park an integer >= 0\n\n${usage}`);
    process.exitCode = 2;
    return;
  }
  const model = new Llama2(readCheckpoint(values.model));
  const tokenizer = Tokenizer.read(values.tokenizer, model.config.vocabSize);
  const server = createInferenceServer({ model, tokenizer, sessionBudgetBytes: budget, maxSessions, parkBytes });
  server.listen(port, values.host, () => {
    const address = server.address();
    const where = typeof address === 'object' && address !== null ? `http://${values.host}:${address.port}` : String(address);
    console.log(`kvslim example server on ${where} (POST /generate, GET /stats, DELETE /sessions/:id)`);
  });
  const stop = () => server.close();
  process.once('SIGINT', stop);
  process.once('SIGTERM', stop);
}

if (runsAsScript(import.meta.url)) {
  try {
    main(process.argv.slice(2));
  } catch (error) {
    process.stderr.write(`server: ${(error as Error).message}\n`);
    process.exitCode = 1;
  }
}
