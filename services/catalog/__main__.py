import asyncio

from services.catalog import main
from shared.config import load_config

asyncio.run(main(load_config()))
