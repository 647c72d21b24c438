from services.scheduler import main
from shared.config import load_config
from shared.runtime import run

run(main(load_config()))
