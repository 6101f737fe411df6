// Drives Cube's gateway with grpc-web clients that Cube did not write, for integration-tests/tests/grpc_web.rs:
// binary mode (application/grpc-web+proto) with Connect's grpc-web transport for Node; text mode
// (application/grpc-web-text, base64) with the official grpc-web client running in a jsdom page on the allowed
// origin, so its calls are cross-origin and pass CORS (preflight, exposed headers) as in a browser; and CORS
// requests by hand with fetch.
//
// Usage: node client.mjs GATEWAY_URL DESCRIPTOR_SET...
// The descriptor sets (encoded google.protobuf.FileDescriptorSet) must describe cube.testing.v1.EchoService and
// grpc.health.v1.Health. Prints one flat JSON object of observations (strings, or null for an absent header) for
// the Rust test to judge, and exits 1 with the reason on stderr when a step fails outright.

import { readFileSync } from "node:fs";

import { create, createFileRegistry, fromBinary, toBinary } from "@bufbuild/protobuf";
import { FileDescriptorSetSchema } from "@bufbuild/protobuf/wkt";
import { BinaryReader, WireType } from "@bufbuild/protobuf/wire";
import { Code, ConnectError, createClient } from "@connectrpc/connect";
import { createGrpcWebTransport } from "@connectrpc/connect-node";
import grpcWeb from "grpc-web";
import { JSDOM, VirtualConsole } from "jsdom";

const [baseUrl, ...descriptorPaths] = process.argv.slice(2);
if (!baseUrl || descriptorPaths.length === 0) {
  console.error("usage: node client.mjs GATEWAY_URL DESCRIPTOR_SET...");
  process.exit(2);
}

const ALLOWED_ORIGIN = "http://web.test";
const OTHER_ORIGIN = "http://evil.test";
const CALL_TIMEOUT_MS = 10_000;
const PACKAGE_VERSIONS = Object.fromEntries(
  ["@connectrpc/connect-node", "grpc-web", "jsdom"].map((name) => [
    name,
    JSON.parse(readFileSync(new URL(`./node_modules/${name}/package.json`, import.meta.url), "utf8")).version,
  ]),
);

const files = new Map();
for (const path of descriptorPaths) {
  for (const file of fromBinary(FileDescriptorSetSchema, readFileSync(path)).file) {
    files.set(file.name, file);
  }
}
const registry = createFileRegistry(create(FileDescriptorSetSchema, { file: [...files.values()] }));
const lookup = (kind, name) => {
  const found = registry[kind](name);
  if (!found) throw new Error(`${name} is in none of the descriptor sets ${descriptorPaths.join(", ")}`);
  return found;
};
const Echo = lookup("getService", "cube.testing.v1.EchoService");
const Health = lookup("getService", "grpc.health.v1.Health");
const EchoRequest = lookup("getMessage", "cube.testing.v1.EchoRequest");
const ServingStatus = lookup("getEnum", "grpc.health.v1.HealthCheckResponse.ServingStatus");

const results = {};
const failures = [];
let step = "start";

async function run(name, body) {
  step = name;
  try {
    await body();
  } catch (error) {
    failures.push(`${name}: ${error?.stack ?? error}`);
  }
}

function servingStatusName(number) {
  return ServingStatus.values.find((value) => value.number === number)?.name ?? String(number);
}

// Decodes grpc-status-details-bin (a google.rpc.Status) on its own, from the protobuf wire format: it checks
// what went over the wire rather than what either client library makes of it.
function decodeStatusDetails(base64) {
  const fields = (bytes, onField) => {
    const reader = new BinaryReader(bytes);
    while (reader.pos < reader.len) {
      const [number, type] = reader.tag();
      if (type === WireType.LengthDelimited) {
        onField(number, reader.bytes());
      } else {
        reader.skip(type, number);
      }
    }
  };
  const text = (bytes) => new TextDecoder().decode(bytes);
  const decoded = { types: [], reason: null, domain: null, violationFields: [] };
  // google.rpc.Status: 3 = repeated google.protobuf.Any details {1 = type_url, 2 = value}.
  fields(Buffer.from(base64, "base64"), (number, any) => {
    if (number !== 3) return;
    let typeUrl = "";
    let value = new Uint8Array();
    fields(any, (anyField, bytes) => {
      if (anyField === 1) typeUrl = text(bytes);
      if (anyField === 2) value = bytes;
    });
    const type = typeUrl.slice(typeUrl.lastIndexOf("/") + 1);
    decoded.types.push(type);
    if (type === "google.rpc.ErrorInfo") {
      // ErrorInfo: 1 = reason, 2 = domain, 3 = metadata.
      fields(value, (field, bytes) => {
        if (field === 1) decoded.reason = text(bytes);
        if (field === 2) decoded.domain = text(bytes);
      });
    } else if (type === "google.rpc.BadRequest") {
      // BadRequest: 1 = repeated FieldViolation {1 = field, 2 = description}.
      fields(value, (field, violation) => {
        if (field !== 1) return;
        fields(violation, (violationField, bytes) => {
          if (violationField === 1) decoded.violationFields.push(text(bytes));
        });
      });
    }
  });
  return decoded;
}

function recordError(prefix, code, message, detailsBase64) {
  results[`${prefix}.code`] = String(code);
  results[`${prefix}.message`] = message;
  if (detailsBase64 == null) {
    results[`${prefix}.detailTypes`] = null;
    return;
  }
  const details = decodeStatusDetails(detailsBase64);
  results[`${prefix}.detailTypes`] = details.types.join(",");
  results[`${prefix}.reason`] = details.reason;
  results[`${prefix}.domain`] = details.domain;
  results[`${prefix}.violationFields`] = details.violationFields.join(",");
}

// Binary mode: Connect's grpc-web transport for Node, over HTTP/1.1.
async function binaryMode() {
  const mode = "binary";
  results[`${mode}.client`] = `@connectrpc/connect-node ${PACKAGE_VERSIONS["@connectrpc/connect-node"]}`;
  const transport = createGrpcWebTransport({ baseUrl, httpVersion: "1.1", useBinaryFormat: true });
  const echo = createClient(Echo, transport);
  const health = createClient(Health, transport);

  await run(`${mode}.unary`, async () => {
    const response = await echo.echo(
      { message: "hello binary" },
      {
        headers: { "x-test-header": "binary-header" },
        timeoutMs: CALL_TIMEOUT_MS,
        onHeader: (headers) => {
          results[`${mode}.unary.contentType`] = headers.get("content-type");
        },
      },
    );
    results[`${mode}.unary.message`] = response.message;
    results[`${mode}.unary.header`] = response.metadata["x-test-header"] ?? null;
  });

  await run(`${mode}.stream`, async () => {
    const messages = [];
    for await (const response of echo.echoStream(
      { message: "binary", count: 3 },
      { timeoutMs: CALL_TIMEOUT_MS },
    )) {
      messages.push(response.message);
    }
    results[`${mode}.stream.messages`] = messages.join(",");
  });

  await run(`${mode}.watch`, async () => {
    const abort = new AbortController();
    try {
      for await (const response of health.watch({ service: "" }, { signal: abort.signal })) {
        results[`${mode}.watch.status`] = servingStatusName(response.status);
        abort.abort();
      }
      results[`${mode}.watch.end`] = "ended by the server";
    } catch (error) {
      const connectError = ConnectError.from(error);
      results[`${mode}.watch.end`] =
        connectError.code === Code.Canceled ? "cancelled" : `error ${connectError.code}: ${connectError.message}`;
    }
  });

  await run(`${mode}.error`, async () => {
    try {
      await echo.echo({ message: "refuse me", failCode: 3 }, { timeoutMs: CALL_TIMEOUT_MS });
      results[`${mode}.error.code`] = "0";
    } catch (error) {
      const connectError = ConnectError.from(error);
      recordError(
        `${mode}.error`,
        connectError.code,
        connectError.rawMessage,
        connectError.metadata.get("grpc-status-details-bin"),
      );
      // What Connect itself made of the details, next to the independent decoding above.
      results[`${mode}.error.connectDetailTypes`] = connectError.details
        .map((detail) => detail.desc?.typeName ?? detail.type)
        .join(",");
    }
  });
}

// Text mode: the official grpc-web client (GrpcWebClientBase, format "text") in a jsdom page. It finds
// XMLHttpRequest through the global; jsdom's behaves as browsers' do where Node polyfills fall short: it grows
// responseText and fires readystatechange as each chunk arrives, which text-mode streaming needs (xhr2 and
// xmlhttprequest-ssl fill responseText only at the end), sends the Accept header it is given (xmlhttprequest 1.8
// appends it to "*/*"), and enforces CORS for the page's origin.
async function textMode() {
  const mode = "text";
  results[`${mode}.client`] = `grpc-web ${PACKAGE_VERSIONS["grpc-web"]} in jsdom ${PACKAGE_VERSIONS.jsdom}`;
  const openPage = (origin) => new JSDOM("", { url: `${origin}/`, virtualConsole: new VirtualConsole() });
  const allowedPage = openPage(ALLOWED_ORIGIN);
  let page = allowedPage;
  // The content type of the last response to each method path, as the page saw it.
  const contentTypes = new Map();
  globalThis.XMLHttpRequest = function XMLHttpRequest() {
    const xhr = new page.window.XMLHttpRequest();
    xhr.addEventListener("readystatechange", () => {
      if (xhr.readyState === xhr.HEADERS_RECEIVED) {
        contentTypes.set(new URL(xhr.responseURL).pathname, xhr.getResponseHeader("content-type"));
      }
    });
    return xhr;
  };

  const client = new grpcWeb.GrpcWebClientBase({ format: "text" });
  const descriptor = (service, localName, methodType) => {
    const method = service.methods.find((candidate) => candidate.localName === localName);
    const path = `/${service.typeName}/${method.name}`;
    return {
      path,
      url: `${baseUrl}${path}`,
      method: new grpcWeb.MethodDescriptor(
        path,
        methodType,
        Object,
        Object,
        (request) => toBinary(method.input, create(method.input, request)),
        (bytes) => fromBinary(method.output, bytes),
      ),
    };
  };
  const deadline = () => ({ deadline: String(Date.now() + CALL_TIMEOUT_MS) });
  const unary = (call, request, metadata) =>
    new Promise((resolve, reject) => {
      client.rpcCall(call.url, request, { ...deadline(), ...metadata }, call.method, (error, response) =>
        error ? reject(error) : resolve(response),
      );
    });

  const echoCall = descriptor(Echo, "echo", grpcWeb.MethodType.UNARY);
  await run(`${mode}.unary`, async () => {
    const response = await unary(echoCall, { message: "hello text" }, { "x-test-header": "text-header" });
    results[`${mode}.unary.contentType`] = contentTypes.get(echoCall.path) ?? null;
    results[`${mode}.unary.message`] = response.message;
    results[`${mode}.unary.header`] = response.metadata["x-test-header"] ?? null;
  });

  await run(`${mode}.stream`, async () => {
    const call = descriptor(Echo, "echoStream", grpcWeb.MethodType.SERVER_STREAMING);
    const messages = [];
    await new Promise((resolve, reject) => {
      const stream = client.serverStreaming(call.url, { message: "text", count: 3 }, deadline(), call.method);
      stream.on("data", (response) => messages.push(response.message));
      stream.on("error", reject);
      stream.on("end", resolve);
    });
    results[`${mode}.stream.messages`] = messages.join(",");
  });

  await run(`${mode}.watch`, async () => {
    const call = descriptor(Health, "watch", grpcWeb.MethodType.SERVER_STREAMING);
    await new Promise((resolve, reject) => {
      // Watch never ends on its own: a status that arrives proves the response is read as it streams.
      const stream = client.serverStreaming(call.url, { service: "" }, {}, call.method);
      stream.on("data", (response) => {
        results[`${mode}.watch.status`] = servingStatusName(response.status);
        stream.cancel();
        results[`${mode}.watch.end`] = "cancelled";
        resolve();
      });
      stream.on("error", reject);
      stream.on("end", () => {
        results[`${mode}.watch.end`] = "ended by the server";
        resolve();
      });
    });
  });

  await run(`${mode}.error`, async () => {
    try {
      await unary(echoCall, { message: "refuse me", failCode: 3 }, {});
      results[`${mode}.error.code`] = "0";
    } catch (error) {
      if (!(error instanceof grpcWeb.RpcError)) throw error;
      // The details reach the page only because the gateway exposes grpc-status-details-bin to its origin.
      recordError(`${mode}.error`, error.code, error.message, error.metadata?.["grpc-status-details-bin"]);
    }
  });

  await run(`${mode}.otherOrigin`, async () => {
    page = openPage(OTHER_ORIGIN);
    try {
      await unary(echoCall, { message: "from another origin" }, {});
      results[`${mode}.otherOrigin.code`] = "0";
    } catch (error) {
      if (!(error instanceof grpcWeb.RpcError)) throw error;
      results[`${mode}.otherOrigin.code`] = String(error.code);
      results[`${mode}.otherOrigin.message`] = error.message;
    } finally {
      page.window.close();
      page = allowedPage;
    }
  });
  allowedPage.window.close();
}

// CORS, with fetch: Node sends whatever headers it is given, so it can play a browser on either origin.
async function cors() {
  const echoUrl = `${baseUrl}/cube.testing.v1.EchoService/Echo`;
  const preflight = (origin) =>
    fetch(echoUrl, {
      method: "OPTIONS",
      headers: {
        origin,
        "access-control-request-method": "POST",
        "access-control-request-headers": "content-type,x-grpc-web,x-user-agent",
      },
      signal: AbortSignal.timeout(CALL_TIMEOUT_MS),
    });

  await run("cors.preflight", async () => {
    const response = await preflight(ALLOWED_ORIGIN);
    results["cors.preflight.status"] = String(response.status);
    results["cors.preflight.allowOrigin"] = response.headers.get("access-control-allow-origin");
    results["cors.preflight.allowMethods"] = response.headers.get("access-control-allow-methods");
    results["cors.preflight.allowHeaders"] = response.headers.get("access-control-allow-headers");
  });

  await run("cors.post", async () => {
    const message = toBinary(EchoRequest, create(EchoRequest, { message: "from a browser" }));
    const frame = new Uint8Array(5 + message.length);
    new DataView(frame.buffer).setUint32(1, message.length);
    frame.set(message, 5);
    const response = await fetch(echoUrl, {
      method: "POST",
      headers: {
        origin: ALLOWED_ORIGIN,
        "content-type": "application/grpc-web+proto",
        "x-grpc-web": "1",
      },
      body: frame,
      signal: AbortSignal.timeout(CALL_TIMEOUT_MS),
    });
    await response.arrayBuffer();
    results["cors.post.status"] = String(response.status);
    results["cors.post.allowOrigin"] = response.headers.get("access-control-allow-origin");
    results["cors.post.exposeHeaders"] = response.headers.get("access-control-expose-headers");
  });

  await run("cors.otherOrigin", async () => {
    const response = await preflight(OTHER_ORIGIN);
    results["cors.otherOrigin.status"] = String(response.status);
    results["cors.otherOrigin.allowOrigin"] = response.headers.get("access-control-allow-origin");
  });
}

const watchdog = setTimeout(() => {
  console.error(`client.mjs: still in step ${step} after 30 s; results so far: ${JSON.stringify(results)}`);
  console.error(`failures so far:\n${failures.join("\n")}`);
  process.exit(1);
}, 30_000);

await binaryMode();
await textMode();
await cors();
clearTimeout(watchdog);

console.log(JSON.stringify(results, null, 1));
if (failures.length > 0) {
  console.error(`client.mjs: ${failures.length} step(s) failed:\n${failures.join("\n")}`);
}
// Kept-alive connections would hold the process open for a while.
process.exit(failures.length > 0 ? 1 : 0);
