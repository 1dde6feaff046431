"""A Modbus TCP server written by someone else (pymodbus 3.8), for the acquisition tests.

Units 1 and 2 answer with different data in all four tables; reads past protocol
address 9 are refused with exception 2 (illegal data address), as pymodbus does for a
range outside its blocks.

Usage: python3 pymodbus_server.py PORT
"""

import asyncio
import sys

from pymodbus.datastore import (
    ModbusSequentialDataBlock,
    ModbusServerContext,
    ModbusSlaveContext,
)
from pymodbus.server import StartAsyncTcpServer

# Unit -> (holding, input, coils, discrete inputs), from protocol address 0.
# Holding: float32 21.5 (ABCD for unit 1, CDAB for unit 2), a uint16, an int16 (-2 / -3).
TABLES = {
    1: ([0x41AC, 0x0000, 1234, 0xFFFE], [2305, 7], [True, False, True], [False, True]),
    2: ([0x0000, 0x41AC, 4321, 0xFFFD], [1111, 9], [False, True, False], [True, False]),
}


def block(values, length=10):
    # pymodbus reads protocol address a from block address a + 1.
    padded = list(values) + [0] * (length - len(values))
    return ModbusSequentialDataBlock(1, padded)


def unit(tables):
    holding, inputs, coils, discrete = tables
    return ModbusSlaveContext(hr=block(holding), ir=block(inputs), co=block(coils), di=block(discrete))


async def main(port):
    context = ModbusServerContext(slaves={u: unit(t) for u, t in TABLES.items()}, single=False)
    await StartAsyncTcpServer(context=context, address=("127.0.0.1", port))


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1])))
