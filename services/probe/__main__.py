import asyncio

from services.probe import main
from shared.config import load_config

asyncio.run(main(load_config()))
