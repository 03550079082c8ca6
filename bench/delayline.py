"""A TCP delay line in front of a local server: a link with round trips, for the benchmark.

``python bench/delayline.py LISTEN_PORT UPSTREAM_PORT ONE_WAY_SECONDS``: every chunk either way is
passed on ``ONE_WAY_SECONDS`` after it arrived (in order), and a new connection's first bytes wait
one round trip more (its TCP handshake); bandwidth is not limited. Prints "ready" once listening.
"""

from __future__ import annotations

import asyncio
import sys
import time


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay: float, first: float) -> None:
    queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

    async def arrive() -> None:
        while True:
            data = await reader.read(1 << 16)
            queue.put_nowait((time.monotonic() + delay, data))
            if not data:
                return

    arriving = asyncio.ensure_future(arrive())
    try:
        await asyncio.sleep(first)
        while True:
            due, data = await queue.get()
            await asyncio.sleep(max(0.0, due - time.monotonic()))
            if not data:
                if writer.can_write_eof():
                    writer.write_eof()
                return
            writer.write(data)
            await writer.drain()
    except OSError:  # (ConnectionError included) the other side went away
        pass
    finally:
        arriving.cancel()


async def _serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, upstream: int, delay: float) -> None:
    try:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", upstream)
    except OSError:
        writer.close()
        return
    await asyncio.gather(_pump(reader, up_writer, delay, 2 * delay), _pump(up_reader, writer, delay, 0.0))
    for w in (up_writer, writer):
        w.close()


async def _main(listen: int, upstream: int, delay: float) -> None:
    server = await asyncio.start_server(lambda r, w: _serve(r, w, upstream, delay), "127.0.0.1", listen)
    print("ready", flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(_main(int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])))
