from nibblora.merge.cli import main

raise SystemExit(main())
