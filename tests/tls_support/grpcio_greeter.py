"""A grpc-core (Python grpcio) greeter for tai-loadbalancer's TLS interop tests.

Serves greeter.v1.Greeter/SayHello (raw protobuf, no generated code) and grpc.health.v1
over TLS on 127.0.0.1 (an ephemeral port), optionally requiring client certificates.

    python grpcio_greeter.py NAME CERT_FILE KEY_FILE [CLIENT_CA_FILE]

Prints "ready PORT" once serving. Commands on stdin, one per line:
    set SERVICE SERVING|NOT_SERVING   (SERVICE "-" is the server as a whole, "")
    quit
The reply's `server` field is NAME; its `message` is "Hello, <name>! client=<CN>", where CN
is the client certificate's common name ("" without one).
"""

import sys
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc


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


def read_name(request):
    """The `name` field (1) of a HelloRequest."""
    i = 0
    while i < len(request):
        key, shift = 0, 0
        while True:
            b = request[i]
            i += 1
            key |= (b & 0x7F) << shift
            shift += 7
            if b < 0x80:
                break
        number, wire = key >> 3, key & 7
        if wire == 0:
            while request[i] & 0x80:
                i += 1
            i += 1
        elif wire == 2:
            length, shift = 0, 0
            while True:
                b = request[i]
                i += 1
                length |= (b & 0x7F) << shift
                shift += 7
                if b < 0x80:
                    break
            if number == 1:
                return request[i : i + length].decode()
            i += length
        else:
            return ""
    return ""


def main():
    name, cert_file, key_file = sys.argv[1:4]
    client_ca = open(sys.argv[4], "rb").read() if len(sys.argv) > 4 else None
    cert, key = open(cert_file, "rb").read(), open(key_file, "rb").read()

    def say_hello(request, context):
        cn = context.auth_context().get("x509_common_name", [b""])[0].decode()
        message = "Hello, %s! client=%s" % (read_name(request), cn)
        return string_field(1, message) + string_field(2, name)

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    handler = grpc.method_handlers_generic_handler(
        "greeter.v1.Greeter", {"SayHello": grpc.unary_unary_rpc_method_handler(say_hello)}
    )
    server.add_generic_rpc_handlers((handler,))
    servicer = health.HealthServicer(experimental_non_blocking=True)
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    for service in ("", "greeter.v1.Greeter"):
        servicer.set(service, health_pb2.HealthCheckResponse.SERVING)
    credentials = grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=client_ca, require_client_auth=client_ca is not None
    )
    port = server.add_secure_port("127.0.0.1:0", credentials)
    server.start()
    print("ready %d" % port, flush=True)
    for line in sys.stdin:
        words = line.split()
        if words[:1] == ["set"] and len(words) == 3:
            service = "" if words[1] == "-" else words[1]
            status = health_pb2.HealthCheckResponse.ServingStatus.Value(words[2])
            servicer.set(service, status)
            print("ok", flush=True)
        elif words[:1] == ["quit"]:
            break
    server.stop(0)


if __name__ == "__main__":
    main()
