from nibblora.compare.cli import main

raise SystemExit(main())
