#!/usr/bin/env python3
"""A simulated Modbus TCP device for the integration tests: pymodbus's server (an independent
implementation), with 100 coils, discrete inputs, holding and input registers, all zero.

    modbus_sim.py --port PORT [--host 127.0.0.1] [--unit 1]

Prints `ready PORT` on stdout once it accepts connections, then takes commands on stdin, one a
line, and answers each with one line:

    set TABLE ADDRESS VALUE...   ->  ok            (TABLE: hr, ir, co, di; coils as 0/1)
    get TABLE ADDRESS COUNT      ->  values V...
    anything wrong               ->  error TEXT

It exits when stdin closes or on SIGTERM.
"""

import argparse
import asyncio
import sys

try:
    from pymodbus.server import ModbusTcpServer
    from pymodbus.simulator import SimData, SimDevice, DataType
except ImportError as error:  # the test reads this line and names what is missing
    print(f"error pymodbus is not installed (pip install pymodbus): {error}", flush=True)
    sys.exit(3)

SIZE = 100
# Function codes the server's datastore is addressed with: (read, write) per table.
TABLES = {"co": (1, 15), "di": (2, 2), "hr": (3, 16), "ir": (4, 4)}


def device(unit):
    bits = lambda: [SimData(0, count=SIZE, values=False, datatype=DataType.BITS)]
    registers = lambda: [SimData(0, count=SIZE, values=0, datatype=DataType.REGISTERS)]
    # Separate tables, one bit per coil address (KubeEdge's devices are addressed that way).
    return SimDevice(
        id=unit,
        simdata=(bits(), bits(), registers(), registers()),
        use_bit_addressing=True,
    )


async def command(server, unit, line):
    words = line.split()
    if len(words) < 3 or words[0] not in ("set", "get") or words[1] not in TABLES:
        return f"error cannot parse {line!r}"
    verb, table, address = words[0], words[1], int(words[2])
    read_code, write_code = TABLES[table]
    if verb == "set":
        values = [int(w) for w in words[3:]]
        if table in ("co", "di"):
            values = [bool(v) for v in values]
        result = await server.context.async_setValues(unit, write_code, address, values)
        return "ok" if result is None else f"error {result}"
    count = int(words[3]) if len(words) > 3 else 1
    result = await server.context.async_getValues(unit, read_code, address, count)
    if not isinstance(result, list):
        return f"error {result}"
    return "values " + " ".join(str(int(v)) for v in result)


async def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--unit", type=int, default=1)
    args = parser.parse_args()

    server = ModbusTcpServer(device(args.unit), address=(args.host, args.port))
    # Returns once this server listens, and raises when it cannot bind: a probe of the port
    # could be answered by another process's server on it.
    await server.serve_forever(background=True)
    print(f"ready {args.port}", flush=True)

    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while line := await reader.readline():
        line = line.decode().strip()
        if not line:
            continue
        try:
            answer = await command(server, args.unit, line)
        except Exception as error:  # noqa: BLE001 - every failure is answered, never fatal
            answer = f"error {error}"
        print(answer, flush=True)
    await server.shutdown()


if __name__ == "__main__":
    asyncio.run(main())
