// Requests/s, output tokens/s and the time left, worked out in the browser from successive samples of a
// batch's request_counts and usage (the API has no rate fields). A sliding window of the last WINDOW seconds
// follows changes in pace; until it spans enough time, the average since the batch started running stands
// in. Ended batches show the average over their whole run.

const WINDOW_SECONDS = 20;
const MIN_SPAN_SECONDS = 1.5;
const ENDED = new Set(["completed", "failed", "expired", "cancelled"]);

function done(batch) {
  const counts = batch.request_counts || {};
  return (counts.completed || 0) + (counts.failed || 0);
}

function outputTokens(batch) {
  return (batch.usage && batch.usage.output_tokens) || 0;
}

function endedAt(batch) {
  return batch.completed_at || batch.failed_at || batch.expired_at || batch.cancelled_at || null;
}

export class Rates {
  constructor() {
    this.samples = new Map(); // batch id -> [{t, done, tokens}]
  }

  // Record what a fresh copy of the batch says; returns the batch's estimate.
  observe(batch, now = Date.now() / 1000) {
    let samples = this.samples.get(batch.id);
    if (!samples) {
      samples = [];
      this.samples.set(batch.id, samples);
    }
    const sample = { t: now, done: done(batch), tokens: outputTokens(batch) };
    const last = samples[samples.length - 1];
    if (last && sample.done < last.done) samples.length = 0; // a different run (or a restore): start over
    samples.push(sample);
    while (samples.length > 2 && now - samples[0].t > WINDOW_SECONDS) samples.shift();
    return this.estimate(batch, now);
  }

  estimate(batch, now = Date.now() / 1000) {
    const total = (batch.request_counts && batch.request_counts.total) || 0;
    const finished = done(batch);
    if (ENDED.has(batch.status)) {
      const start = batch.in_progress_at;
      const end = endedAt(batch);
      const span = start && end ? end - start : 0;
      return {
        live: false,
        requestsPerSecond: span > 0 ? finished / span : null,
        tokensPerSecond: span > 0 ? outputTokens(batch) / span : null,
        eta: null,
      };
    }
    if (batch.status !== "in_progress" && batch.status !== "finalizing") {
      return { live: false, requestsPerSecond: null, tokensPerSecond: null, eta: null };
    }
    let requestsPerSecond = null;
    let tokensPerSecond = null;
    const samples = this.samples.get(batch.id) || [];
    const first = samples[0];
    const last = samples[samples.length - 1];
    if (first && last && last.t - first.t >= MIN_SPAN_SECONDS) {
      requestsPerSecond = (last.done - first.done) / (last.t - first.t);
      tokensPerSecond = (last.tokens - first.tokens) / (last.t - first.t);
    } else if (batch.in_progress_at && now - batch.in_progress_at >= 1) {
      // Not enough samples yet: the average since it started (server time; good enough until the window fills).
      requestsPerSecond = finished / (now - batch.in_progress_at);
      tokensPerSecond = outputTokens(batch) / (now - batch.in_progress_at);
    }
    const remaining = Math.max(0, total - finished);
    let eta = null;
    if (batch.status === "in_progress" && total > 0) {
      if (remaining === 0) eta = 0;
      else if (requestsPerSecond > 0) eta = remaining / requestsPerSecond;
    }
    const late = eta !== null && batch.expires_at ? now + eta > batch.expires_at : false;
    return { live: true, requestsPerSecond, tokensPerSecond, eta, late };
  }

  forgetExcept(ids) {
    for (const id of this.samples.keys()) if (!ids.has(id)) this.samples.delete(id);
  }
}

export { endedAt, ENDED };
