"""A TCP proxy on loopback that delays every chunk it forwards, to stand in for a remote store.

    python benchmarks/delay_proxy.py LISTEN_PORT TARGET_PORT DELAY_MS

Forwards 127.0.0.1:LISTEN_PORT to 127.0.0.1:TARGET_PORT (e.g. a SeaweedFS S3 endpoint) and
waits DELAY_MS before passing on each chunk, in both directions. With 10 ms, a small S3 GET
through SeaweedFS took a median 49.5 ms instead of 8.4 ms. Used with `bench_resume.py` where
the kernel has no `netem` to delay loopback traffic.
"""

from __future__ import annotations

import asyncio
import sys


async def forward(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                  delay: float) -> None:
    """Copy one direction of a connection, `delay` seconds late per chunk."""
    try:
        while chunk := await reader.read(1 << 16):
            await asyncio.sleep(delay)
            writer.write(chunk)
            await writer.drain()
    except ConnectionError:
        pass  # the other side closed; closing ours ends the pair
    finally:
        writer.close()


async def serve(listen: int, target: int, delay: float) -> None:
    async def connect(client_reader, client_writer) -> None:
        server_reader, server_writer = await asyncio.open_connection("127.0.0.1", target)
        await asyncio.gather(forward(client_reader, server_writer, delay),
                             forward(server_reader, client_writer, delay))

    server = await asyncio.start_server(connect, "127.0.0.1", listen)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    listen_port, target_port, delay_ms = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
    asyncio.run(serve(listen_port, target_port, delay_ms / 1000))
