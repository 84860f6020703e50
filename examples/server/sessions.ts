// Sessions of the example server: one KVCache per conversation, kept between turns, forked
// copy-on-write for requests that share a prefix, each under a memory budget. Beyond maxSessions
// the least recently used idle session is parked: its cache saved (saveAsync, off the event loop)
// and freed, and loaded back (loadAsync) when a request names it again.
import { randomUUID } from 'node:crypto';

import { KVCache, type PolicySpec, type ResolvedPolicy } from '../../lib/index.js';
import type { Llama2 } from '../../lib/models/llama2c/model.js';

/** An error the server answers with an HTTP status and a JSON body `{ error: { code, message } }`. */
export class RequestError extends Error {
  constructor(readonly status: number, readonly code: string, message: string) {
    super(message);
    this.name = 'RequestError';
  }
}

/** How many more tokens a session may feed, and which limit that is. */
export interface Room {
  tokens: number;
  limit: 'budget' | 'context';
}

/** Bytes one token costs per kv head and layer (K and V) in a store; KIVI: the packed codes, scales and minima. */
function tokenBytes(store: ResolvedPolicy['store'], headDim: number): number {
  switch (store.kind) {
    case 'f32': return headDim * 2 * 4;
    case 'kivi': return 2 * ((headDim * store.bits) / 8 + (4 * headDim) / store.group);
    default: return headDim * 2 * 2;
  }
}

export class Session {
  readonly id: string;
  /** The session this one was forked from, if any. */
  readonly parent: string | null;
  readonly cache: KVCache;
  /** Most bytes of keys and values (`stats().bytes.kv`) this session may hold. */
  readonly budgetBytes: number;
  /** Tokens sampled but not fed to the cache yet (the last token of the previous turn). */
  pending: number[] = [];
  turns = 0;
  /** True while a request generates on this session; a second one gets 409. */
  busy = false;

  constructor(id: string, parent: string | null, cache: KVCache, budgetBytes: number) {
    this.id = id;
    this.parent = parent;
    this.cache = cache;
    this.budgetBytes = budgetBytes;
  }

  /** The same session over another cache (a parked session loaded back). */
  withCache(cache: KVCache): Session {
    const session = new Session(this.id, this.parent, cache, this.budgetBytes);
    session.pending = [...this.pending];
    session.turns = this.turns;
    return session;
  }

  /** Tokens in the cache. */
  get tokens(): number {
    return this.cache.tokens(0);
  }

  /** Key and value bytes one token costs across all layers in this session's store. */
  get bytesPerToken(): number {
    const { layers, kvHeads, headDim, policy } = this.cache;
    return layers * kvHeads * tokenBytes(policy.store, headDim);
  }

  /** Tokens that may still be fed: the tighter of the memory budget and the model's context. */
  room(seqLen: number): Room {
    const budgetTokens = Math.floor(this.budgetBytes / this.bytesPerToken);
    return budgetTokens < seqLen
      ? { tokens: budgetTokens - this.tokens, limit: 'budget' }
      : { tokens: seqLen - this.tokens, limit: 'context' };
  }

  /** What GET /stats shows: the session's state and its cache's live stats(). */
  describe() {
    return {
      id: this.id, parent: this.parent, policy: this.cache.policy, budgetBytes: this.budgetBytes,
      tokens: this.tokens, pendingTokens: this.pending.length, turns: this.turns, busy: this.busy,
      stats: this.cache.stats(),
    };
  }
}

export interface SessionStoreOptions {
  /** Live sessions kept at most; beyond it the least recently used idle one is parked (or dropped). */
  maxSessions: number;
  /** Budget of a session that asks for none, and the most one may ask for. */
  budgetBytes: number;
  /** Bytes of saved caches parked sessions may hold (default 0: none; the oldest go first). */
  parkBytes?: number;
}

/** A session whose cache was saved and freed: its save (pending until saveAsync settles) and state. */
interface Parked {
  session: Session;
  bytes: Promise<Buffer>;
  /** The save's length once it settled (counted against parkBytes), else 0. */
  size: number;
}

/** Sessions by id, least recently used first. */
export class SessionStore {
  readonly #model: Llama2;
  readonly #options: SessionStoreOptions;
  readonly #sessions = new Map<string, Session>();
  readonly #parked = new Map<string, Parked>();  // least recently parked first
  readonly #resuming = new Map<string, Promise<Session | undefined>>();
  #parkedBytes = 0;

  constructor(model: Llama2, options: SessionStoreOptions) {
    this.#model = model;
    this.#options = options;
  }

  get size(): number {
    return this.#sessions.size;
  }

  get budgetBytes(): number {
    return this.#options.budgetBytes;
  }

  /**
   * The session with this id, loaded back first if it was parked (now the most recently used), or
   * undefined.
   */
  resume(id: string): Promise<Session | undefined> {
    const loading = this.#resuming.get(id);
    if (loading !== undefined) return loading;  // two requests for one parked session share its load
    const parked = this.#parked.get(id);
    if (parked === undefined) return Promise.resolve(this.get(id));
    const resumed = this.#load(parked).finally(() => this.#resuming.delete(id));
    this.#resuming.set(id, resumed);
    return resumed;
  }

  async #load(parked: Parked): Promise<Session | undefined> {
    const { id } = parked.session;
    const cache = await KVCache.loadAsync(await parked.bytes, { device: parked.session.cache.device });
    // Deleted, or replaced by a new session of its id, while it loaded.
    if (this.#parked.get(id) !== parked) {
      cache.dispose();
      return this.get(id);
    }
    this.#unpark(id);
    const session = parked.session.withCache(cache);
    try {
      this.add(session);
    } catch (error) {
      cache.dispose();
      throw error;
    }
    return session;
  }

  /** Parked sessions: id and saved bytes (0 while the save runs). */
  parked(): Array<{ id: string; bytes: number }> {
    return [...this.#parked].map(([id, parked]) => ({ id, bytes: parked.size }));
  }

  /** The live session with this id (now the most recently used), or undefined. */
  get(id: string): Session | undefined {
    const session = this.#sessions.get(id);
    if (session !== undefined) {
      this.#sessions.delete(id);
      this.#sessions.set(id, session);
    }
    return session;
  }

  /**
   * A new, unregistered session with an empty cache (`add` keeps it). A bad policy throws the
   * cache's `KVSlimError` (`ERR_OPTION`).
   */
  create(id: string | undefined, policy: PolicySpec | undefined, budgetBytes = this.#options.budgetBytes): Session {
    this.#checkBudget(budgetBytes);
    const cache = this.#model.createCache(policy === undefined ? {} : { policy });
    return new Session(id ?? randomUUID(), null, cache, budgetBytes);
  }

  /** A new, unregistered session sharing `source`'s cache copy-on-write and its pending tokens. */
  fork(source: Session, id: string | undefined): Session {
    const session = new Session(id ?? randomUUID(), source.id, source.cache.fork(), source.budgetBytes);
    session.pending = [...source.pending];
    return session;
  }

  /** Registers a session, parking (or dropping) the least recently used idle ones beyond maxSessions. */
  add(session: Session): void {
    if (this.#sessions.has(session.id)) throw new RequestError(409, 'ERR_CONFLICT', `Session '${session.id}' already exists`);
    this.#unpark(session.id);  // a new session of a parked one's id replaces it
    for (const [id, old] of this.#sessions) {
      if (this.#sessions.size < this.#options.maxSessions) break;
      if (old.busy) continue;
      if ((this.#options.parkBytes ?? 0) > 0) this.#park(old);
      else this.delete(id);
    }
    if (this.#sessions.size >= this.#options.maxSessions) {
      throw new RequestError(503, 'ERR_BUSY', `All ${this.#options.maxSessions} sessions are generating; retry later`);
    }
    this.#sessions.set(session.id, session);
  }

  /** Drops a session (live or parked) and frees its cache; false when there is none. */
  delete(id: string): boolean {
    if (this.#unpark(id)) return true;
    const session = this.#sessions.get(id);
    if (session === undefined) return false;
    this.#sessions.delete(id);
    session.cache.dispose();
    return true;
  }

  // Saves an idle session's cache off the event loop and frees it (dispose() lets the save
  // finish first); the oldest parked saves go while they exceed parkBytes.
  #park(session: Session): void {
    this.#sessions.delete(session.id);
    const parked: Parked = { session, bytes: session.cache.saveAsync(), size: 0 };
    session.cache.dispose();
    this.#parked.set(session.id, parked);
    parked.bytes.then((bytes) => {
      if (this.#parked.get(session.id) !== parked) return;  // resumed or deleted meanwhile
      parked.size = bytes.length;
      this.#parkedBytes += bytes.length;
      for (const [id, old] of this.#parked) {
        if (this.#parkedBytes <= (this.#options.parkBytes ?? 0)) break;
        if (old.size > 0) this.#unpark(id);
      }
    }, () => {
      if (this.#parked.get(session.id) === parked) this.#unpark(session.id);  // a failed save drops the session
    });
  }

  // Forgets a parked session; false when there is none.
  #unpark(id: string): boolean {
    const parked = this.#parked.get(id);
    if (parked === undefined) return false;
    this.#parked.delete(id);
    this.#parkedBytes -= parked.size;
    return true;
  }

  /** Every session, least recently used first. */
  list(): Session[] {
    return [...this.#sessions.values()];
  }

  /** Frees every cache and parked save (server shutdown). */
  clear(): void {
    for (const id of [...this.#sessions.keys(), ...this.#parked.keys()]) this.delete(id);
  }

  #checkBudget(budgetBytes: number): void {
    if (!Number.isSafeInteger(budgetBytes) || budgetBytes < 1 || budgetBytes > this.#options.budgetBytes) {
      throw new RequestError(
        400, 'ERR_BAD_REQUEST', `Expected budgetBytes to be an integer in [1, ${this.#options.budgetBytes}] but received ${String(budgetBytes)}`,
      );
    }
  }
}
