"""CamoXpert camouflaged object detection: ``python train_ultimate.py {train,evaluate,predict} ...``."""
from camoxpert.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
