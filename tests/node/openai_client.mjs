// The official openai client against a running `moescope serve`: node openai_client.mjs BASE_URL API_KEY
// Exits 0 when every check holds; prints what it checked.
import OpenAI from "openai";
import assert from "node:assert/strict";

const [baseURL, apiKey] = process.argv.slice(2);
const client = new OpenAI({ baseURL, apiKey, maxRetries: 0 });
const model = "tiny";

const models = await client.models.list();
assert.equal(models.data[0].id, model);

// Completions: plain, then streamed; greedy text is the same both ways.
const prompt = "Janet has 16 eggs.";
const plain = await client.completions.create({ model, prompt, max_tokens: 10, temperature: 0, ignore_eos: true });
assert.equal(plain.object, "text_completion");
assert.equal(plain.usage.completion_tokens, 10);
let streamed = "";
let sawUsage = false;
const stream = await client.completions.create({
  model, prompt, max_tokens: 10, temperature: 0, ignore_eos: true, stream: true, stream_options: { include_usage: true },
});
for await (const chunk of stream) {
  if (chunk.usage) sawUsage = chunk.usage.completion_tokens === 10;
  for (const c of chunk.choices) streamed += c.text;
}
assert.equal(streamed, plain.choices[0].text);
assert.ok(sawUsage, "the usage chunk");

// Chat: plain, then streamed.
const messages = [{ role: "user", content: "How many eggs are left?" }];
const chat = await client.chat.completions.create({ model, messages, max_tokens: 8, temperature: 0 });
assert.equal(chat.choices[0].message.role, "assistant");
let content = "";
for await (const chunk of await client.chat.completions.create({ model, messages, max_tokens: 8, temperature: 0, stream: true })) {
  content += chunk.choices[0]?.delta?.content ?? "";
}
assert.equal(content, chat.choices[0].message.content);

// Errors arrive as the client's typed errors with the server's message.
await assert.rejects(client.completions.create({ model, prompt, max_tokens: -1 }), (e) => {
  assert.equal(e.status, 400);
  assert.match(e.message, /max_tokens/);
  return true;
});
await assert.rejects(client.completions.create({ model: "gpt-4", prompt }), (e) => e.status === 404);
const wrongKey = new OpenAI({ baseURL, apiKey: "wrong", maxRetries: 0 });
await assert.rejects(wrongKey.models.list(), (e) => e.status === 401);

console.log(JSON.stringify({ ok: true, completion: plain.choices[0].text, chat: chat.choices[0].message.content }));
