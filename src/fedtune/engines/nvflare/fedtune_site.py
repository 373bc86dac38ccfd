"""fedtune's site script for NVIDIA FLARE.

FLARE copies this file into the job (`custom/fedtune_site.py`) and launches it once per
job on each site, as a separate process that stays alive across rounds. All the logic is
in the installed fedtune package: `fedtune.engines.nvflare.site.main`.
"""

from pathlib import Path

from fedtune.engines.nvflare.site import main

if __name__ == "__main__":
    main(Path(__file__).resolve().parents[1])  # the app folder: <app>/custom/fedtune_site.py
