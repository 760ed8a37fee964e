from nibblora.quantize.cli import main

raise SystemExit(main())
