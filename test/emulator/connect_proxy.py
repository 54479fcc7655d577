"""A minimal HTTP CONNECT proxy for pgphi's tests (127.0.0.1 only): tunnels to
127.0.0.1 targets, refuses everything else, and appends one line per tunnel
("CONNECT host:port") to STATE_DIR/proxy.log. Usage: connect_proxy.py STATE_DIR;
the port goes to STATE_DIR/proxy_port."""
import os
import socket
import sys
import threading


def pipe(source, sink):
    try:
        while True:
            data = source.recv(65536)
            if not data:
                break
            sink.sendall(data)
    except OSError:
        pass
    finally:
        for s in (source, sink):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def serve(client, log_path):
    request = b""
    while b"\r\n\r\n" not in request and len(request) < 8192:
        chunk = client.recv(4096)
        if not chunk:
            client.close()
            return
        request += chunk
    line = request.split(b"\r\n", 1)[0].decode("latin-1")
    parts = line.split()
    if len(parts) != 3 or parts[0] != "CONNECT" or not parts[1].startswith("127.0.0.1:"):
        client.sendall(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n")
        client.close()
        return
    with open(log_path, "a") as log:
        log.write(f"CONNECT {parts[1]}\n")
    upstream = socket.create_connection(("127.0.0.1", int(parts[1].split(":")[1])), timeout=10)
    upstream.settimeout(None)
    client.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
    threading.Thread(target=pipe, args=(client, upstream), daemon=True).start()
    pipe(upstream, client)


def main():
    state = sys.argv[1]
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    with open(os.path.join(state, "proxy_port.tmp"), "w") as out:
        out.write(str(listener.getsockname()[1]))
    os.replace(os.path.join(state, "proxy_port.tmp"), os.path.join(state, "proxy_port"))
    while True:
        client, _ = listener.accept()
        threading.Thread(target=serve, args=(client, os.path.join(state, "proxy.log")), daemon=True).start()


if __name__ == "__main__":
    main()
