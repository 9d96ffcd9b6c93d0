"""A grpc-core (Python grpcio) greeter that reports the trace context it received.

Serves greeter.v1.Greeter/SayHello (raw protobuf, no generated code) in plaintext on
127.0.0.1 (an ephemeral port). The reply's `message` is
"traceparent=<value>;tracestate=<value>" with the values of the call's invocation metadata
("-" when absent), and its `server` is NAME.

    python grpcio_traceparent.py NAME

Prints "ready PORT" once serving; stops when stdin closes.
"""

import sys
from concurrent import futures

import grpc


def varint(n):
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def string_field(number, text):
    data = text.encode()
    return varint(number << 3 | 2) + varint(len(data)) + data


def main():
    name = sys.argv[1]

    def say_hello(request, context):
        metadata = dict(context.invocation_metadata())
        message = "traceparent=%s;tracestate=%s" % (
            metadata.get("traceparent", "-"),
            metadata.get("tracestate", "-"),
        )
        return string_field(1, message) + string_field(2, name)

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    handler = grpc.method_handlers_generic_handler(
        "greeter.v1.Greeter", {"SayHello": grpc.unary_unary_rpc_method_handler(say_hello)}
    )
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    print("ready %d" % port, flush=True)
    for _ in sys.stdin:
        pass
    server.stop(0)


if __name__ == "__main__":
    main()
